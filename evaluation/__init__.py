"""Evaluation: score generated portraits the way PortraitBooth and FastComposer do, and run
FastComposer's protocol (subjects x 40 prompts x images per prompt) through ComfyUI.

    python -m evaluation score --references refs/ --images generated/ --out report/
    python -m evaluation protocol --start --subjects refs/ --checkpoint sd15.safetensors \
        --weights portraitbooth.safetensors --out report/

A package of its own, beside `training/`: it needs neither the training loop nor its
dependencies, and users with a finished model run it without anything else.
"""
