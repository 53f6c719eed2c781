"""What a run loads before its first step:

  load         the SD1.5 checkpoint through ComfyUI (UNet, CLIP, VAE), trainable parameters
  lora         LoRA adapters on the UNet's attention layers
  precision    fp32 / bf16 / fp16 for the device, autocast
  text_cache   the frozen text encoder's encodings, once per caption
  warm_start   FastComposer's files: its UNet (init_unet), its projector (the stage 0
               teacher) and its CLIP vision model, checked from their headers first
"""
