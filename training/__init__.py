"""Training package: datasets, the PortraitBooth training loop (noise, localization and
identity losses), distributed launch and export to the weight file the nodes load.

    python -m training build <people folders> <dataset>     sources, face_crops, captions, build, shards
    python -m training train --config run.toml [--set k=v]  config, models, lora, data, losses, step,
    torchrun --nproc_per_node N -m training train ...       trainer, checkpoint, distributed, ema,
    python -m training export --output <run folder>         metrics, validate, export

It imports the same `portraitbooth_core` modules as the nodes and runs ComfyUI's own
SD1.5 classes (loaded with ComfyUI's loader), so training and inference share one UNet.
"""
