"""API-format graphs of ComfyUI's built-in nodes, shared by `generate` and the tests."""
from __future__ import annotations


def txt2img(checkpoint: str, prompt: str, negative: str = "", width: int = 512,
            height: int = 512, steps: int = 20, cfg: float = 5.0, seed: int = 0,
            sampler: str = "euler", scheduler: str = "normal", batch_size: int = 1,
            prefix: str = "portraitbooth") -> dict:
    """Load checkpoint -> encode -> sample -> decode -> save, as ComfyUI's API takes it."""
    return {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": checkpoint}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": prompt, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": negative, "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage",
              "inputs": {"width": width, "height": height, "batch_size": batch_size}},
        "5": {"class_type": "KSampler",
              "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                         "latent_image": ["4", 0], "seed": seed, "steps": steps, "cfg": cfg,
                         "sampler_name": sampler, "scheduler": scheduler, "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
