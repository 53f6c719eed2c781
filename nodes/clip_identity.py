"""CLIP Vision Identity: photos of one person -> FastComposer's subject embedding.

Thin: preprocessing and encoding are `portraitbooth_core.face.clip_image`; the optional
face encoder (ours) only finds the face that the "person around face" crop centres on.
The output is the same FaceEmbedding socket Analyze Faces gives, with a `clip_vision:...`
kind, so Apply STEA Conditioning refuses it for a face-recognizer projector by name.
"""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from portraitbooth_core.face import DEFAULT_DET_THRESHOLD, NoFaceError
from portraitbooth_core.face.clip_image import (CLIP_MEAN, CLIP_STD, CROP_MODES, clip_image_identity, fastcomposer_pixels,
                                                person_crop_box)
from portraitbooth_core.face.images import comfy_to_uint8_list
from portraitbooth_core.face.photomaker_photos import photomaker_identity

from .base import CheckedNode
from .contracts import FaceEmbedding, FaceEncoder

log = logging.getLogger("portraitbooth")
CATEGORY = "PortraitBooth/face"
FULL, PERSON = CROP_MODES
FASTCOMPOSER, PHOTOMAKER_V1, PHOTOMAKER_V2 = MODES = ("FastComposer", "PhotoMaker v1", "PhotoMaker v2")


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
            description="Photos of one person -> the identity a CLIP-based file reads. FastComposer: the CLIP "
                        "ViT-L/14 image embedding of the photo (padded to a square, 224 px), averaged. PhotoMaker "
                        "v1: the tower's hidden states per photo (centre crop, 224 px); v2: those plus each "
                        "photo's insightface embedding (needs face_encoder). Feeds Apply STEA Conditioning.",
            inputs=[
                io.ClipVision.Input("clip_vision",
                                    tooltip="From Load CLIP Vision: the encoder the import wrote, "
                                            "fastcomposer_clip_vit_l14.safetensors (`python -m training "
                                            "import-fastcomposer`) or photomaker-v*_clip_vit_l14.safetensors "
                                            "(`import-photomaker`)."),
                io.Image.Input("images", tooltip="One or more photos of the same person (a batch). FastComposer "
                                                 "averages them; PhotoMaker stacks them: each photo adds class-word "
                                                 "copies (v1: 1, v2: 2) to the prompt."),
                io.Combo.Input("crop", options=list(CROP_MODES), default=FULL,
                               tooltip=f"'{FULL}': the whole photo, as both demos (PhotoMaker then centre-crops "
                                       f"it to a square). '{PERSON}': a head-and-shoulders crop around the largest "
                                       "face first (closer to FastComposer's training crops; needs face_encoder)."),
                io.Float.Input("det_threshold", default=DEFAULT_DET_THRESHOLD, min=0.05, max=0.99, step=0.01,
                               tooltip=f"Face detection confidence for '{PERSON}' and for '{PHOTOMAKER_V2}''s "
                                       "face embeddings; lower it if a real face is missed."),
                # optional: graphs saved before PhotoMaker came (no "mode") keep running as FastComposer
                io.Combo.Input("mode", options=list(MODES), default=FASTCOMPOSER, optional=True,
                               tooltip=f"Which file the identity is for. '{FASTCOMPOSER}': FastComposer's image "
                                       f"embedding. '{PHOTOMAKER_V1}' / '{PHOTOMAKER_V2}': PhotoMaker's inputs (SDXL); "
                                       f"v2 also needs face_encoder with the insightface pack buffalo_l (raw "
                                       f"embedding, BGR, as PhotoMaker trained; non-commercial licence), and "
                                       f"drops photos without a face, with a warning naming them."),
                FaceEncoder.Input("face_encoder", optional=True,
                                  tooltip=f"From Load FaceEncoder. '{PHOTOMAKER_V2}': required, with the insightface "
                                          f"pack buffalo_l (its ArcFace embedding is part of v2's identity). Other "
                                          f"modes: only for crop '{PERSON}', to find the face (any pack)."),
            ],
            outputs=[FaceEmbedding.Output(display_name="face_embedding"),
                     io.Image.Output(display_name="preview", tooltip="The 224x224 pixels the CLIP vision model "
                                                                     "read, one per photo.")],
        )

    @classmethod
    def execute(cls, clip_vision, images, crop, det_threshold, mode=FASTCOMPOSER, face_encoder=None) -> io.NodeOutput:
        if clip_vision is None or not hasattr(clip_vision, "encode_image"):
            raise TypeError("clip_vision: connect Load CLIP Vision (fastcomposer_clip_vit_l14.safetensors or "
                            "photomaker-v*_clip_vit_l14.safetensors).")
        if mode not in MODES:
            raise ValueError(f"mode: {str(mode)[:40]!r} is not one of {', '.join(MODES)}")
        boxes = None
        if crop == PERSON:
            if face_encoder is None:
                raise ValueError(f"crop '{PERSON}' needs a face encoder to find the face: connect Load FaceEncoder "
                                 f"(PortraitBooth) to face_encoder, or set crop to '{FULL}'.")
            boxes = person_boxes(face_encoder, images, det_threshold)
        n = len(images)
        names = [f"image {i + 1} of {n}" for i in range(n)]
        if mode != FASTCOMPOSER:
            return cls.photomaker(clip_vision, images, mode, det_threshold, face_encoder, names, boxes)
        identity = clip_image_identity(clip_vision, images, names=names, boxes=boxes, crop_mode=crop)
        pixels = fastcomposer_pixels(images, boxes=boxes)
        print(f"CLIP Vision Identity: {n} photo(s), crop '{crop}', {identity.kind} ({identity.dim}-d, "
              f"norm {float(identity.vector.norm()):.1f})", flush=True)
        return io.NodeOutput(identity, pixels)

    @classmethod
    def photomaker(cls, clip_vision, images, mode, det_threshold, face_encoder, names, boxes) -> io.NodeOutput:
        import comfy.clip_vision

        if boxes is not None:  # the crop first, then PhotoMaker's own centre crop of what is left
            images = torch.stack([_resized(images[i, y1:y2, x1:x2], images.shape[1:3]) for i, (x1, y1, x2, y2)
                                  in enumerate(boxes)])
        photos = photomaker_identity(clip_vision, images, "v1" if mode == PHOTOMAKER_V1 else "v2",
                                     face_encoder=face_encoder, det_threshold=det_threshold, names=names)
        for warning in photos.warnings:
            log.warning("PortraitBooth: CLIP Vision Identity: %s", warning)
        kept = photos.identity.metadata.get("sources", names)
        pixels = comfy.clip_vision.clip_preprocess(images[[names.index(k) for k in kept]], crop=True)
        pixels = (pixels * torch.tensor(CLIP_STD).view(1, 3, 1, 1) + torch.tensor(CLIP_MEAN).view(1, 3, 1, 1))
        print(f"CLIP Vision Identity: {len(kept)} of {len(names)} photo(s), mode '{mode}', {photos.identity.kind}",
              flush=True)
        return io.NodeOutput(photos.identity, pixels.movedim(1, -1).clamp(0, 1),
                             ui={"text": ["\n".join(photos.notes + [f"WARNING: {w}" for w in photos.warnings])]})


def _resized(image: torch.Tensor, size) -> torch.Tensor:
    """One HWC crop back to the batch's size (a ComfyUI IMAGE batch has one size)."""
    import torch.nn.functional as F

    return F.interpolate(image.movedim(-1, 0)[None], size=tuple(size), mode="bicubic",
                         antialias=True)[0].movedim(0, -1).clamp(0, 1)


NODES = [CLIPVisionIdentity]
