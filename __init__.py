"""PortraitBooth for ComfyUI: identity-preserving portraits from one photo, no fine-tuning.

ComfyUI imports this file; it must stay light. Node modules import their heavy or
optional dependencies (onnxruntime, facexlib, dlib, ...) only when a node runs, so a
missing optional package disables one node with a clear message instead of the pack.
"""
import os
import sys

# The ComfyUI-free core (`portraitbooth_core`) and `training` are plain top-level
# packages so that nodes, the training CLI and the tests all import the same modules.
# Appended, not prepended: nothing here may shadow ComfyUI's own modules.
_PACK_DIR = os.path.dirname(os.path.abspath(__file__))
if _PACK_DIR not in sys.path:
    sys.path.append(_PACK_DIR)


async def comfy_entrypoint():
    from .nodes import PortraitBoothExtension

    return PortraitBoothExtension()
