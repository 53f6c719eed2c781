"""ComfyUI node classes (V3 schema). Thin: every node calls `portraitbooth_core`.

One module per node family; each exports `NODES`, the classes it registers.
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import ecac, face, identity, regions, scoring, training

CATEGORY = "PortraitBooth"


class PortraitBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*face.NODES, *identity.NODES, *ecac.NODES, *regions.NODES, *scoring.NODES, *training.NODES]
