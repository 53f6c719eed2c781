"""Imported once by the fork server the dataset builder's workers fork from: the slow
imports (torch, ComfyUI, the CLIP tokenizer) and the token finder are then shared by
every worker instead of each worker repeating them. Nothing here may start threads or
touch a GPU: the fork server forks after it."""
import os

# Tokenizing before a fork would make every worker disable (and warn about) the tokenizer's
# own threads; each worker is one of many processes, so they are off from the start.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
try:
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=True, path=find_comfyui())  # the tokenizer only; workers choose their device
    from .analyze import default_finder

    default_finder()
except Exception:  # noqa: BLE001 - a worker then makes these itself and reports what fails
    pass
