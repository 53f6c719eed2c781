"""Weight formats of other projects, imported into files this pack and ComfyUI load. One
module per format, each holding its key map, validation and conversion:

  fastcomposer   FastComposer's release (pytorch_model.bin): UNet, CLIP vision, postfuse
  photomaker     PhotoMaker v1/v2 (photomaker-v*.bin, SDXL): CLIP vision, ID head, LoRA
  release        reading a released file without running its code (both use it)

The command line's `python -m training import-<format>` only calls into these.
"""
