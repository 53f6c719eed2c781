"""CLIP Vision Identity: photos of one person -> FastComposer's subject embedding.

Thin: preprocessing and encoding are `portraitbooth_core.face.clip_image`; the optional
face encoder (ours) only finds the face that the "person around face" crop centres on.
The output is the same FaceEmbedding socket Analyze Faces gives, with a `clip_vision:...`
kind, so Apply STEA Conditioning refuses it for a face-recognizer projector by name.
"""
from __future__ import annotations

from comfy_api.latest import io

from portraitbooth_core.face import DEFAULT_DET_THRESHOLD, NoFaceError
from portraitbooth_core.face.clip_image import CROP_MODES, clip_image_identity, fastcomposer_pixels, person_crop_box
from portraitbooth_core.face.images import comfy_to_uint8_list

from .base import CheckedNode
from .contracts import FaceEmbedding, FaceEncoder

CATEGORY = "PortraitBooth/face"
FULL, PERSON = CROP_MODES


def person_boxes(face_encoder, images, det_threshold: float) -> list[tuple[int, int, int, int]]:
    """One head-and-shoulders box per image, around its largest face."""
    arrays = comfy_to_uint8_list(images)
    boxes = []
    for i, image in enumerate(arrays):
        h, w = image.shape[:2]
        faces = face_encoder.detect(image, det_threshold)
        if not faces:
            raise NoFaceError(f"crop '{PERSON}': no face found in image {i + 1} of {len(arrays)} (index {i}), "
                              f"{w}x{h} px. Use a photo with a clearly visible face, lower det_threshold (now "
                              f"{det_threshold:.2f}), or set crop to '{FULL}'.", i)
        face = max(faces, key=lambda f: f.area)
        boxes.append(person_crop_box(face.box, w, h))
    return boxes


class CLIPVisionIdentity(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothCLIPVisionIdentity",
            display_name="CLIP Vision Identity (PortraitBooth)",
            category=CATEGORY,
            description="Photos of one person -> FastComposer's subject embedding: the CLIP ViT-L/14 image "
                        "embedding of the photo (padded to a square, 224 px). Feeds Apply STEA Conditioning "
                        "with a FastComposer weight file; face-recognizer PortraitBooth files refuse it.",
            inputs=[
                io.ClipVision.Input("clip_vision",
                                    tooltip="From Load CLIP Vision: fastcomposer_clip_vit_l14.safetensors, the "
                                            "encoder written by `python -m training import-fastcomposer`."),
                io.Image.Input("images", tooltip="One or more photos of the same person (a batch); their "
                                                 "embeddings are averaged."),
                io.Combo.Input("crop", options=list(CROP_MODES), default=FULL,
                               tooltip=f"'{FULL}': the whole photo, as FastComposer's demo. '{PERSON}': a "
                                       "head-and-shoulders crop around the largest face (closer to FastComposer's "
                                       "training crops; needs face_encoder)."),
                io.Float.Input("det_threshold", default=DEFAULT_DET_THRESHOLD, min=0.05, max=0.99, step=0.01,
                               tooltip=f"Face detection confidence for '{PERSON}'; lower it if a real face is "
                                       "missed. Unused for the full photo."),
                FaceEncoder.Input("face_encoder", optional=True,
                                  tooltip=f"From Load FaceEncoder; only needed for crop '{PERSON}' (it finds the "
                                          "face). Any pack works: its recognizer is not used."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding"),
                     io.Image.Output(display_name="preview", tooltip="The 224x224 pixels the CLIP vision model "
                                                                     "read, one per photo.")],
        )

    @classmethod
    def execute(cls, clip_vision, images, crop, det_threshold, face_encoder=None) -> io.NodeOutput:
        if clip_vision is None or not hasattr(clip_vision, "encode_image"):
            raise TypeError("clip_vision: connect Load CLIP Vision (fastcomposer_clip_vit_l14.safetensors).")
        boxes = None
        if crop == PERSON:
            if face_encoder is None:
                raise ValueError(f"crop '{PERSON}' needs a face encoder to find the face: connect Load FaceEncoder "
                                 f"(PortraitBooth) to face_encoder, or set crop to '{FULL}'.")
            boxes = person_boxes(face_encoder, images, det_threshold)
        n = len(images)
        names = [f"image {i + 1} of {n}" for i in range(n)]
        identity = clip_image_identity(clip_vision, images, names=names, boxes=boxes, crop_mode=crop)
        pixels = fastcomposer_pixels(images, boxes=boxes)
        print(f"CLIP Vision Identity: {n} photo(s), crop '{crop}', {identity.kind} ({identity.dim}-d, "
              f"norm {float(identity.vector.norm()):.1f})", flush=True)
        return io.NodeOutput(identity, pixels)


NODES = [CLIPVisionIdentity]
