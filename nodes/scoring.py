"""Identity Score: rank generated images by how much they look like the reference person.

Thin wrapper over portraitbooth_core.scoring.identity_score (the same score the evaluation CLI reports).
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from portraitbooth_core.face.types import DEFAULT_DET_THRESHOLD
from portraitbooth_core.scoring.identity_score import IdentityScorer, format_report, ranking

from .base import CheckedNode
from .contracts import FaceEmbedding, FaceEncoder

CATEGORY = "PortraitBooth/evaluate"


class IdentityScore(CheckedNode):
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
                io.Float.Input("det_threshold", default=DEFAULT_DET_THRESHOLD, min=0.05, max=0.99, step=0.01,
                               tooltip="Detection confidence; faces below it count as no face. The default is "
                                       "Analyze Faces' (insightface's)."),
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
        threshold, note = same_person_threshold(face_encoder)
        # "no face found" lines already say it all; the others get the verdict
        lines = [format_report([scores[i]], names) + (f" -> {verdict(scores[i], threshold)}"
                                                      if scores[i].faces else "") for i in order]
        header = (f"Identity Score ({face_encoder.kind}), " + ("best first" if sort else "in batch order")
                  + f"; mean {sum(s.score for s in scores) / max(len(scores), 1):.3f}")
        rule = (f"same person when cos >= {threshold:.2f} ({note})" if threshold is not None
                else f"no same-person threshold known for {face_encoder.kind}: compare scores only")
        report = "\n".join([header, *lines, rule])
        print(report, flush=True)
        out = images[torch.tensor(order, dtype=torch.long)] if sort else images
        return io.NodeOutput(out, [scores[i].score for i in order], list(order), report)


def same_person_threshold(face_encoder) -> tuple[float | None, str]:
    """The cosine above which this recognizer's two embeddings count as one person, and where
    that number comes from: a bare cosine means different things for different recognizers
    (two different people score about 0.8 with dlib, under 0.3 with ArcFace)."""
    recognizer = getattr(face_encoder, "recognizer", None)
    threshold = getattr(recognizer, "same_person_cosine", None)
    kind = str(getattr(face_encoder, "kind", ""))
    if threshold is None:
        return None, ""
    if kind.startswith("dlib"):
        return float(threshold), ("dlib documents L2 0.6 between descriptors as the same-person limit; its "
                                  "descriptors have norm ~1.39, so that is cos ~0.9")
    if kind.startswith("arcface"):
        return float(threshold), ("a usual ArcFace verification threshold: one person mostly scores 0.4-0.8, "
                                  "two people mostly below 0.3")
    return float(threshold), "the recognizer's own threshold"


def verdict(score, threshold: float | None) -> str:
    if not score.face_found:
        return "no face"
    if threshold is None:
        return "no verdict"
    cosines = [s.cosine for s in score.subjects]
    if any(c is None for c in cosines):
        return "not every subject found"
    return "same person" if min(cosines) >= threshold else "not the same person"


NODES = [IdentityScore]
