"""ComfyUI-free core of PortraitBooth: pure torch/numpy code that the nodes, the
training package and the tests share. Nothing here imports ComfyUI."""

__version__ = "0.1.0"
