"""Face analysis: detect, align, embed and mask faces; build identities.

Importing this package is cheap: onnxruntime, cv2, dlib, facexlib, onnx2torch and
insightface are imported only when a backend that needs them is built (see
portraitbooth_core.optional). insightface packs (antelopev2, buffalo_l) run through
insightface itself (insight.py); the zero-download RetinaFace + dlib need no insightface.
"""
from .align import ARCFACE_TEMPLATE, align_face, align_faces_torch, similarity_transform, warp_affine_torch
from .encoder import Analysis, FaceEncoder, ImageResult, NO_FACE_ACTIONS, SELECT_RULES
from .errors import FaceAnalysisError, IdentityError, NoFaceError, PackError
from .identity import (COMBINE_MODES, MEAN_OF_NORMALISED, NORMALISED_MEAN, build_identity, combine_embeddings,
                       cosine, mix_identities, parse_weights)
from .identity_file import IdentityFileError, describe_identity_file, load_identity, save_identity
from .images import comfy_to_uint8_list, to_uint8_rgb, uint8_to_comfy
from .loader import DETECTORS, RECOGNIZERS, build_encoder, find_parsing_weights
from .packs import find_packs, inspect_pack, load_pack, pack_folder
from .runtime import PROVIDER_CHOICES
from .types import DEFAULT_DET_THRESHOLD, EMBEDDING_FORMS, FACE_ORDERS, DetectedFace, Identity

__all__ = [
    "ARCFACE_TEMPLATE", "Analysis", "COMBINE_MODES", "DEFAULT_DET_THRESHOLD", "DETECTORS", "DetectedFace",
    "EMBEDDING_FORMS",
    "FACE_ORDERS", "FaceAnalysisError",
    "FaceEncoder", "Identity", "IdentityError", "IdentityFileError", "ImageResult", "MEAN_OF_NORMALISED",
    "NORMALISED_MEAN", "NO_FACE_ACTIONS", "NoFaceError", "PROVIDER_CHOICES", "PackError", "RECOGNIZERS",
    "SELECT_RULES", "align_face", "align_faces_torch", "build_encoder", "build_identity", "combine_embeddings",
    "comfy_to_uint8_list", "cosine", "describe_identity_file", "find_packs", "find_parsing_weights",
    "inspect_pack", "load_identity", "load_pack", "mix_identities", "pack_folder", "parse_weights",
    "save_identity",
    "similarity_transform", "to_uint8_rgb", "uint8_to_comfy", "warp_affine_torch",
]
