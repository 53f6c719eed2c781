"""Face analysis: detect, align, embed and mask faces; build identities.

Importing this package is cheap: onnxruntime, cv2, dlib, facexlib and onnx2torch are
imported only when a backend that needs them is built (see portraitbooth_core.optional).
"""
from .align import ARCFACE_TEMPLATE, align_face, align_faces_torch, similarity_transform, warp_affine_torch
from .encoder import Analysis, FaceEncoder, ImageResult, NO_FACE_ACTIONS, SELECT_RULES
from .errors import FaceAnalysisError, IdentityError, NoFaceError, PackError
from .identity import build_identity, cosine, mix_identities
from .images import comfy_to_uint8_list, to_uint8_rgb, uint8_to_comfy
from .loader import DETECTORS, RECOGNIZERS, build_encoder, find_parsing_weights
from .packs import find_packs, inspect_pack, load_pack
from .runtime import PROVIDER_CHOICES
from .types import DetectedFace, Identity

__all__ = [
    "ARCFACE_TEMPLATE", "Analysis", "DETECTORS", "DetectedFace", "FaceAnalysisError", "FaceEncoder",
    "Identity", "IdentityError", "ImageResult", "NO_FACE_ACTIONS", "NoFaceError", "PROVIDER_CHOICES",
    "PackError", "RECOGNIZERS", "SELECT_RULES", "align_face", "align_faces_torch", "build_encoder",
    "build_identity", "comfy_to_uint8_list", "cosine", "find_packs", "find_parsing_weights", "inspect_pack",
    "load_pack", "mix_identities", "similarity_transform", "to_uint8_rgb", "uint8_to_comfy",
    "warp_affine_torch",
]
