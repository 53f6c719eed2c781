"""Face analysis nodes: Load FaceEncoder, Analyze Faces. Thin wrappers over
portraitbooth_core.face; heavy backends load when a node runs, not at import."""
from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from portraitbooth_core.face import (COMBINE_MODES, DEFAULT_DET_THRESHOLD, DETECTORS, EMBEDDING_FORMS,
                                     MEAN_OF_NORMALISED, NO_FACE_ACTIONS, PROVIDER_CHOICES, RECOGNIZERS, SELECT_RULES,
                                     PackError, build_encoder, find_packs, find_parsing_weights, uint8_to_comfy)
from portraitbooth_core.face.packs import pack_onnx_files
from portraitbooth_core.face.runtime import cpu_fallback_notice

from .base import CheckedNode
from .contracts import FaceEmbedding, FaceEncoder
from .paths import checked_model_path

CATEGORY = "PortraitBooth/face"
NO_PACK = "none (zero-download RetinaFace)"

# ComfyUI 0.3.75 knows neither folder; other face packs use these same locations.
for _name in ("insightface", "facexlib"):
    if _name not in folder_paths.folder_names_and_paths:
        folder_paths.add_model_folder_path(_name, os.path.join(folder_paths.models_dir, _name), is_default=True)


def _packs() -> dict:
    return find_packs(folder_paths.get_folder_paths("insightface"))


def torch_device(provider: str) -> str | torch.device:
    """Where the torch parts of face analysis run: ComfyUI's device, or the CPU when the
    user chose provider 'cpu'."""
    if provider == "cpu":
        return "cpu"
    import comfy.model_management

    return comfy.model_management.get_torch_device()


class LoadFaceEncoder(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        roots = ", ".join(os.path.join(p, "models", "<pack>") for p in folder_paths.get_folder_paths("insightface"))
        return io.Schema(
            node_id="PortraitBoothLoadFaceEncoder",
            display_name="Load FaceEncoder (PortraitBooth)",
            category=CATEGORY,
            description="Face detector + recognizer + face-mask maker used to turn photos into an identity.",
            inputs=[
                io.Combo.Input("pack", options=[NO_PACK, *_packs()], default=NO_PACK,
                               tooltip=f"insightface model pack (antelopev2, buffalo_l, ...) found in {roots} "
                                       "(a pack unzipped into <pack>/<pack>/ is found too); run by the insightface "
                                       "package, as IPAdapter FaceID, InstantID and PuLID run it; never downloaded. "
                                       "Or none: RetinaFace + dlib, shipped in pip packages, no insightface needed."),
                io.Combo.Input("detector", options=list(DETECTORS), default="auto",
                               tooltip="auto: the pack's SCRFD when a pack is chosen, else RetinaFace."),
                io.Combo.Input("recognizer", options=list(RECOGNIZERS), default="auto",
                               tooltip="auto: the pack's ArcFace when a pack is chosen, else dlib's ResNet. "
                                       "Embeddings of different recognizers cannot be mixed."),
                io.Combo.Input("provider", options=list(PROVIDER_CHOICES), default="auto",
                               tooltip="onnxruntime device. auto uses CUDA when onnxruntime-gpu offers it; on a "
                                       "GPU machine with the CPU-only onnxruntime it says so once in the console "
                                       "and in Analyze Faces' report, with the install command. Face parsing "
                                       "(torch) runs on ComfyUI's device; cpu keeps everything on the CPU."),
                io.Int.Input("det_size", default=640, min=160, max=1280, step=32,
                             tooltip="SCRFD input size in pixels; larger finds smaller faces, slower. When no "
                                     "face is found it retries at smaller sizes (64 px steps down to 256), as "
                                     "IPAdapter FaceID does. Fixed-size exports run at their own size."),
                io.Boolean.Input("mask_ears", default=False, tooltip="Include ears in the face mask (parsing only)."),
                io.Boolean.Input("mask_hair", default=False, tooltip="Include hair in the face mask (parsing only)."),
                io.Boolean.Input("mask_neck", default=False, tooltip="Include the neck in the face mask (parsing only)."),
            ],
            outputs=[FaceEncoder.Output(display_name="face_encoder")],
        )

    @classmethod
    def execute(cls, pack, detector, recognizer, provider, det_size, mask_ears, mask_hair, mask_neck) -> io.NodeOutput:
        pack_dir = None
        if pack != NO_PACK:
            # Only a pack of the list (CheckedNode refused any other value): the name is never
            # turned into a path, so a graph cannot point this node at another folder or learn
            # whether one exists.
            packs = _packs()
            if pack not in packs:
                raise PackError(f"pack: '{pack}' is no longer in the insightface folder (listed: "
                                f"{', '.join([NO_PACK, *packs])}); refresh the node list and pick again.")
            pack_dir = packs[pack]
            # Listed as found, refused here if the folder or one of its models links outside
            # the allowed roots (paths.check_link_target): nothing of it is opened then.
            checked_model_path(pack_dir, "pack", pack)
            for onnx in pack_onnx_files(pack_dir):
                checked_model_path(onnx, "pack", f"{pack}/{onnx.name}")
        folders = folder_paths.get_folder_paths("facexlib")
        parsing = find_parsing_weights(folders)
        if parsing is not None:
            checked_model_path(parsing, "face parsing weights (facexlib folder)")
        encoder = build_encoder(pack_dir, detector, recognizer, provider, det_size,
                                parsing_weights=parsing,
                                parsing_searched="searched " + ", ".join(folders),
                                ears=mask_ears, hair=mask_hair, neck=mask_neck, device=torch_device(provider))
        return io.NodeOutput(encoder)


class AnalyzeFaces(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothAnalyzeFaces",
            display_name="Analyze Faces (PortraitBooth)",
            category=CATEGORY,
            description="Photos of one person -> one identity embedding, face masks and a preview.",
            inputs=[
                FaceEncoder.Input("face_encoder", tooltip="From Load FaceEncoder."),
                io.Image.Input("images", tooltip="One or more photos of the same person (a batch); "
                                                 "their embeddings are averaged."),
                io.Combo.Input("select", options=list(SELECT_RULES), default="largest",
                               tooltip="Which face to use when a photo shows several (the face order, recorded on "
                                       "the identity): the largest (InstantID's and PuLID's rule), the highest "
                                       "detection score (IPAdapter FaceID's: insightface's first face), or the one "
                                       "at face_index counting from the left (0 = leftmost)."),
                io.Int.Input("face_index", default=0, min=0, max=64,
                             tooltip="Used with select=index: 0 is the leftmost face."),
                io.Combo.Input("on_no_face", options=list(NO_FACE_ACTIONS), default="error",
                               tooltip="error: stop and name the photo; skip: leave photos without a face out."),
                io.Float.Input("det_threshold", default=DEFAULT_DET_THRESHOLD, min=0.05, max=0.99, step=0.01,
                               tooltip=f"Detection confidence; lower it if a real face is missed. "
                                       f"{DEFAULT_DET_THRESHOLD} is insightface's default, which IPAdapter FaceID, "
                                       "InstantID and PuLID use."),
                # optional: graphs saved before these existed still queue, with today's result
                io.Combo.Input("combine", options=list(COMBINE_MODES), default=MEAN_OF_NORMALISED, optional=True,
                               tooltip="How several photos become one identity. 'mean of normalised embeddings': "
                                       "every photo counts the same. 'normalised mean': raw embeddings averaged, "
                                       "so photos the recognizer is surer about (sharp, frontal) count more."),
                io.String.Input("weights", default="", optional=True,
                                tooltip="Per-photo weights in batch order, e.g. '1, 0.5, 2': one number >= 0 per "
                                        "photo, not all 0. Empty: equal weights. Photos skipped for having no "
                                        "face drop their weight."),
                io.Combo.Input("embedding", options=list(EMBEDDING_FORMS), default=EMBEDDING_FORMS[0], optional=True,
                               tooltip="normalised: L2-normalised embeddings (IPAdapter FaceID's normed_embedding, "
                                       "and what PortraitBooth models are trained on). raw: the recognizer's "
                                       "output as it is (InstantID's and PuLID's embedding). Recorded on the "
                                       "identity; a model trained on the other form refuses it."),
            ],
            outputs=[
                FaceEmbedding.Output(display_name="face_embedding"),
                io.Mask.Output(display_name="face_mask"),
                io.Image.Output(display_name="preview"),
                io.String.Output(display_name="report"),
            ],
        )

    @classmethod
    def execute(cls, face_encoder, images, select, face_index, on_no_face, det_threshold,
                combine=MEAN_OF_NORMALISED, weights="", embedding=EMBEDDING_FORMS[0]) -> io.NodeOutput:
        analysis = face_encoder.analyze(images, select=select, face_index=face_index,
                                        on_no_face=on_no_face, det_threshold=det_threshold,
                                        combine=combine, weights=weights or None, embedding=embedding)
        print(analysis.report, flush=True)
        # The console says it once per process; the report says it every time, where users look.
        notice = cpu_fallback_notice(getattr(face_encoder, "settings", {}).get("provider", "auto"))
        report = f"{notice}\n{analysis.report}" if notice else analysis.report
        return io.NodeOutput(analysis.identity, analysis.masks(), uint8_to_comfy(analysis.previews), report)


NODES = [LoadFaceEncoder, AnalyzeFaces]
