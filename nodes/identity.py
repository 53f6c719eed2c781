"""Identity nodes: what to do with an identity once Analyze Faces made it (Mix Identities).

Thin: the blend is `portraitbooth_core.face.mix_identities`.
"""
from __future__ import annotations

from comfy_api.latest import io

from portraitbooth_core.face import mix_identities

from .contracts import FaceEmbedding
from .paths import checked_inputs, validate_widget_inputs

CATEGORY = "PortraitBooth/face"


class MixIdentities(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothMixIdentities",
            display_name="Mix Identities (PortraitBooth)",
            category=CATEGORY,
            description="Blend two face identities: weight 0 gives A, 1 gives B.",
            inputs=[
                FaceEmbedding.Input("identity_a", tooltip="First identity (from Analyze Faces)."),
                FaceEmbedding.Input("identity_b", tooltip="Second identity; same FaceEncoder as A."),
                io.Float.Input("weight", default=0.5, min=0.0, max=1.0, step=0.05,
                               tooltip="Share of identity B in the blend."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding")],
        )

    validate_inputs = classmethod(validate_widget_inputs)  # refuse bad values at queue time

    @classmethod
    @checked_inputs
    def execute(cls, identity_a, identity_b, weight) -> io.NodeOutput:
        return io.NodeOutput(mix_identities(identity_a, identity_b, weight))


NODES = [MixIdentities]
