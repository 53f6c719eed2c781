"""ComfyUI node classes (V3 schema). Thin: every node calls `portraitbooth_core`.

One module per node family, named after it; each exports `NODES`, the classes it registers:
  face_analysis  Load FaceEncoder, Analyze Faces       identity     Mix Identities, Save Identity,
                                                                   Load Identity (identity files)
  clip_identity  CLIP Vision Identity (FastComposer's subject embedding)
  stea           Load PortraitBooth Model, Apply STEA   ecac         ECAC Attention Patch, Attention Map Preview
  regions        PortraitBooth Region, Multi-Subject Region Sampler
  scoring        Identity Score                         dip_trainer  DIP Trainer
`contracts` holds the socket types, the file defaults that travel with the projector and
the PortraitBooth entry of a CONDITIONING;
`paths` the rule for which files a node may read or write and the check of every input;
`base` CheckedNode, the base class that applies that check (queue time and execute).
"""
from __future__ import annotations

from comfy_api.latest import ComfyExtension, io

from . import clip_identity, dip_trainer, ecac, face_analysis, identity, regions, scoring, stea

CATEGORY = "PortraitBooth"


class PortraitBoothExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [*face_analysis.NODES, *identity.NODES, *stea.NODES, *ecac.NODES, *regions.NODES, *scoring.NODES,
                *dip_trainer.NODES, *clip_identity.NODES]
