"""Driving a ComfyUI from outside: find and import it, start a server, talk to its HTTP
API, run the pack's API workflows, and the user's headless command (`generate`).

  comfyui    where ComfyUI lives (COMFYUI_PATH, or the host `scripts/setup_host.sh` builds),
             in-process import, the pack imported as ComfyUI imports it
  server     `ComfyServer`: a ComfyUI process with the pack and its own user/input/output/temp
             folders (never ComfyUI's), stopped with its process group
  client     `ComfyClient`: upload, queue, wait, fetch images; `ComfyError`
  workflows  `load_api_workflow`, `with_inputs`: the shipped workflows/api/*.json
  graphs     `txt2img`: plain ComfyUI graphs to compare against
  generate   `python -m headless.generate`: the README's main job

Never imported by the pack inside ComfyUI; tests and benchmarks use it too.
"""
