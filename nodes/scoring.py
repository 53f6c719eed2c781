"""Identity Score: rank generated images by how much they look like the reference person.

Thin wrapper over portraitbooth_core.scoring.identity_score (the same score the evaluation CLI reports).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from portraitbooth_core.scoring.identity_score import IdentityScorer, format_report, ranking

from .contracts import FaceEmbedding, FaceEncoder

CATEGORY = "PortraitBooth/evaluate"


class IdentityScore(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothIdentityScore",
            display_name="Identity Score",
            category=CATEGORY,
            description="Scores each image against the reference identity (max(cos, 0) of face embeddings, "
                        "0 without a face) and can sort the batch best first, to keep the seeds that look "
                        "most like the person.",
            inputs=[
                FaceEncoder.Input("face_encoder", tooltip="From Load FaceEncoder: the same one that analyzed "
                                                          "the reference."),
                FaceEmbedding.Input("reference", tooltip="The person's identity, from Analyze Faces."),
                io.Image.Input("images", tooltip="Generated images (a batch) to score."),
                io.Boolean.Input("sort", default=True, tooltip="Output the images best first."),
                io.Float.Input("det_threshold", default=0.6, min=0.05, max=0.99, step=0.01,
                               tooltip="Detection confidence; faces below it count as no face."),
                FaceEmbedding.Input("reference_2", optional=True,
                                    tooltip="A second person, for two-subject images: faces are matched to "
                                            "the two references greedily and the score is their mean."),
            ],
            outputs=[
                io.Image.Output(display_name="images"),
                io.Float.Output(display_name="scores", is_output_list=True),
                io.Int.Output(display_name="indices", is_output_list=True),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, face_encoder, reference, images, sort, det_threshold, reference_2=None) -> io.NodeOutput:
        refs = [reference] if reference_2 is None else [reference, reference_2]
        scores = IdentityScorer(face_encoder, refs, det_threshold).score_images(images)
        order = ranking(scores) if sort else list(range(len(scores)))
        names = [f"image {i}" for i in range(len(scores))]
        lines = [format_report([scores[i]], names) for i in order]
        header = (f"Identity Score ({face_encoder.kind}), " + ("best first" if sort else "in batch order")
                  + f"; mean {sum(s.score for s in scores) / max(len(scores), 1):.3f}")
        report = "\n".join([header, *lines])
        print(report, flush=True)
        out = images[torch.tensor(order, dtype=torch.long)] if sort else images
        return io.NodeOutput(out, [scores[i].score for i in order], list(order), report)


NODES = [IdentityScore]
