"""Tools to run and drive a real ComfyUI: the test host, the HTTP client, stand-in models.

Shared by the tests, the benchmarks and the headless `generate` command. Modules that
build models import ComfyUI and so need its folder on sys.path (see `host.py`).
"""
