"""The paper's identity metric: FastComposer's MTCNN + FaceNet (InceptionResnetV1, VGGFace2).

`python -m evaluation score --identity-metric facenet --facenet-weights FILE` scores with
this instead of the pack's recognizer. Settings matched to FastComposer's
evaluation/single_object/single_object_evaluation.py (mit-han-lab/fastcomposer):

- MTCNN(image_size=160, margin=0, min_face_size=20, thresholds=[0.6, 0.7, 0.7],
  factor=0.709, post_process=True, keep_all=True), select_largest left at its default
  True: every face is cropped, resized to 160x160 with PIL bilinear (FastComposer passes
  PIL images; facenet-pytorch resizes numpy input with OpenCV instead, so we hand it PIL
  images too), standardized as (x - 127.5) / 128, largest box first.
- InceptionResnetV1 with the VGGFace2 weights, classify=False: its embedding is already
  L2-normalized, identity = max(cosine, 0).
- One subject: the first face MTCNN returns (the largest; IdentityScorer takes the largest
  box, the same face) in the generated image against the first face of the reference; no
  face in the generated image scores 0. Face indices in scores.json count in MTCNN's order
  (largest first), not left to right as with the pack's detectors.
- References: FastComposer uses one photo per subject, the first by file name. So do we
  (no averaging over a subject's photos, unlike the pack scorer); where FastComposer would
  stop with an assertion (no face in that photo) we take the next photo and say so.
- Several subjects: FastComposer released no multi-subject evaluation (its unused
  `greedy_matching` pairs faces and subjects greedily and keeps the *minimum*, and only for
  as many faces as subjects). We score as the pack's IdentityScorer does: every face
  embedded, greedy matching highest cosine first, unmatched subjects 0, image score = the
  mean over subjects, so both metrics fill the same tables the same way.
- Images are read EXIF-rotated like everywhere in evaluation/ (FastComposer does not
  rotate; generated PNGs carry no EXIF, so only camera-made references can differ).

Weights: the detector's come inside the facenet-pytorch wheel and are loaded here with
torch.load(weights_only=True) (facenet-pytorch's own MTCNN calls plain torch.load, so we
build the three networks ourselves and run its detection functions). The recognizer's are
the user's file (facenet-pytorch's release 20180402-114759-vggface2.pt, a state dict, or
the same tensors as .safetensors); nothing is ever downloaded.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from portraitbooth_core.face.errors import NoFaceError
from portraitbooth_core.face.types import DetectedFace

INSTALL_LINE = "python -m pip install --no-deps facenet-pytorch==2.6.0"
WEIGHTS_NAME = "20180402-114759-vggface2.pt"
WEIGHTS_SOURCE = "https://github.com/timesler/facenet-pytorch/releases (release v2.2.9)"
VGGFACE2_CLASSES = 8631  # the classifier head saved in the VGGFace2 file; CASIA-WebFace's has 10575

# FastComposer's MTCNN(...) arguments.
IMAGE_SIZE = 160
MARGIN = 0
MIN_FACE_SIZE = 20
THRESHOLDS = (0.6, 0.7, 0.7)
FACTOR = 0.709


class FaceNetUnavailableError(ImportError, ValueError):
    """facenet-pytorch (or a module it imports) is missing. A ValueError too, so that
    `python -m evaluation` reports it as one line like the user's other setup mistakes."""


class FaceNetWeightsError(FileNotFoundError):
    """The InceptionResnetV1 weights file is missing or is not the VGGFace2 state dict."""


def _facenet_pytorch():
    try:
        import facenet_pytorch
        from facenet_pytorch.models.utils import detect_face
    except ImportError as exc:
        missing = getattr(exc, "name", None) or str(exc)
        if missing.split(".")[0] == "facenet_pytorch":
            raise FaceNetUnavailableError(
                f"--identity-metric facenet needs facenet-pytorch, which is not installed; install it with "
                f"`{INSTALL_LINE}` (--no-deps: its wheel pins torch<2.3 and numpy<2, "
                "which pip would otherwise downgrade)") from exc
        raise FaceNetUnavailableError(
            f"facenet-pytorch is installed but could not import {missing!r} ({exc}); install that package "
            "(facenet-pytorch was installed with --no-deps, so pip did not)") from exc
    return facenet_pytorch, detect_face


def _read_state_dict(path: Path) -> Mapping[str, torch.Tensor]:
    hint = f"Download {WEIGHTS_NAME} from {WEIGHTS_SOURCE} and pass it as --facenet-weights; nothing is downloaded."
    if not path.is_file():
        raise FaceNetWeightsError(f"No InceptionResnetV1 weights at {path}. {hint}")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickles with code, truncated files, wrong formats: all "not the weights"
        raise FaceNetWeightsError(f"{path} could not be read as a state dict ({type(exc).__name__}: {exc}). "
                                  f"{hint}") from exc
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FaceNetWeightsError(f"{path} is not a state dict of tensors. {hint}")
    return state


def load_inception_resnet(path: Path | str, device: str = "cpu") -> torch.nn.Module:
    """InceptionResnetV1(classify=False) with the VGGFace2 weights from `path`, in eval mode."""
    facenet_pytorch, _ = _facenet_pytorch()
    path = Path(path)
    state = dict(_read_state_dict(path))
    hint = f"Use {WEIGHTS_NAME} from {WEIGHTS_SOURCE}."
    head = state.pop("logits.weight", None)
    state.pop("logits.bias", None)  # the classifier head: unused by embeddings
    if head is not None and head.shape[0] != VGGFACE2_CLASSES:
        raise FaceNetWeightsError(f"{path} has a {head.shape[0]}-class head, not VGGFace2's {VGGFACE2_CLASSES} "
                                  f"(CASIA-WebFace's has 10575): FastComposer's metric uses the VGGFace2 weights. "
                                  f"{hint}")
    model = facenet_pytorch.InceptionResnetV1(pretrained=None, classify=False)  # None: no download
    expected = model.state_dict()
    # BatchNorm's step counters do not affect inference; converted files may drop them.
    missing = [k for k in expected if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise FaceNetWeightsError(
            f"{path} is not an InceptionResnetV1 state dict: {len(missing)} key(s) missing (e.g. {missing[:3]}), "
            f"{len(unexpected)} unexpected (e.g. {unexpected[:3]}). {hint}")
    wrong = [f"{k} {tuple(v.shape)} (expected {tuple(expected[k].shape)})" for k, v in state.items()
             if v.shape != expected[k].shape]
    if wrong:
        raise FaceNetWeightsError(f"{path} has tensors of the wrong shape: {'; '.join(wrong[:3])}. {hint}")
    model.load_state_dict(state, strict=False)  # strict on everything but the counters, checked above
    return model.eval().to(device)


def load_mtcnn_nets(device: str = "cpu") -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module]:
    """MTCNN's P-, R- and O-nets with the weights shipped in the facenet-pytorch wheel."""
    facenet_pytorch, _ = _facenet_pytorch()
    data = Path(facenet_pytorch.__file__).resolve().parent / "data"
    nets = []
    for cls, name in ((facenet_pytorch.PNet, "pnet.pt"), (facenet_pytorch.RNet, "rnet.pt"),
                      (facenet_pytorch.ONet, "onet.pt")):
        if not (data / name).is_file():
            raise FaceNetUnavailableError(f"facenet-pytorch's MTCNN weights {data / name} are missing; "
                                          f"reinstall it with `{INSTALL_LINE} --force-reinstall`")
        net = cls(pretrained=False)
        net.load_state_dict(torch.load(data / name, map_location="cpu", weights_only=True))
        nets.append(net.eval().to(device))
    return nets[0], nets[1], nets[2]


def _pil(image: np.ndarray):
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(image, np.uint8))


class _FaceNetRecognizer:
    """InceptionResnetV1 on MTCNN crops: the `recognizer` half IdentityScorer calls."""

    kind = "facenet:inception_resnet_v1-vggface2"

    def __init__(self, model: torch.nn.Module, weights: Path, device: str, extract_face, standardize):
        self.model, self.device = model, device
        self.name = f"InceptionResnetV1 vggface2 ({weights.name})"
        self._extract, self._standardize = extract_face, standardize

    @torch.no_grad()
    def embed_faces(self, image: np.ndarray, faces: Sequence[DetectedFace]) -> np.ndarray:
        """[n, 512] unit embeddings of MTCNN's 160x160 crops of `faces` (boxes from FaceNetMetric.detect)."""
        if not faces:
            return np.zeros((0, 512), np.float32)
        pil = _pil(image)
        crops = torch.stack([self._standardize(self._extract(pil, f.box, IMAGE_SIZE, MARGIN)) for f in faces])
        return self.model(crops.to(self.device)).float().cpu().numpy()


class FaceNetMetric:
    """FastComposer's identity metric with FaceEncoder's scoring surface.

    `detect(image, threshold)` and `recognizer.embed_faces(image, faces)` / `.kind` are what
    portraitbooth_core.scoring.identity_score.IdentityScorer calls; `reference(photos)` makes
    a subject's reference embedding the FastComposer way.
    """

    detector_name = "mtcnn"

    def __init__(self, weights: Path | str, device: str = "cpu"):
        facenet_pytorch, detect_face = _facenet_pytorch()
        self.weights = Path(weights)
        self.device = device
        self._detect_face = detect_face.detect_face
        self.pnet, self.rnet, self.onet = load_mtcnn_nets(device)
        self.recognizer = _FaceNetRecognizer(load_inception_resnet(self.weights, device), self.weights, device,
                                             facenet_pytorch.extract_face,
                                             facenet_pytorch.fixed_image_standardization)
        self.kind = self.recognizer.kind

    @property
    def description(self) -> str:
        """What made the identity numbers, for scores.json and the report."""
        return f"facenet (MTCNN + InceptionResnetV1 vggface2: {self.weights.name})"

    @property
    def settings(self) -> dict:
        """The MTCNN arguments (FastComposer's) and the weights, for scores.json."""
        return {"image_size": IMAGE_SIZE, "margin": MARGIN, "min_face_size": MIN_FACE_SIZE,
                "thresholds": list(THRESHOLDS), "factor": FACTOR, "post_process": True, "keep_all": True,
                "select_largest": True, "weights": str(self.weights), "device": self.device}

    @torch.no_grad()
    def detect(self, image: np.ndarray, threshold: float | None = None) -> list[DetectedFace]:
        """MTCNN's faces in an HxWx3 uint8 image, largest box first (MTCNN.detect with
        select_largest). `threshold` is the pack detector's and is not used: MTCNN's three
        stage thresholds are FastComposer's."""
        boxes, points = self._detect_face(_pil(image), MIN_FACE_SIZE, self.pnet, self.rnet, self.onet,
                                          list(THRESHOLDS), FACTOR, self.device)
        # An object array of float32 scalars for one image: float32 holds them exactly.
        box, point = np.asarray(boxes[0], np.float32).reshape(-1, 5), np.asarray(points[0], np.float32)
        if len(box) == 0:
            return []
        # The very expression MTCNN.detect sorts by, so ties and rounding order the same way.
        order = np.argsort((box[:, 2] - box[:, 0]) * (box[:, 3] - box[:, 1]))[::-1]
        return [DetectedFace(box=box[k, :4].copy(), score=float(box[k, 4]),
                             landmarks=point[k].reshape(5, 2), rank=r)
                for r, k in enumerate(order)]

    def reference(self, photos: Sequence[Path], read_rgb: Callable[[Path], np.ndarray],
                  log: Callable[[str], None] = print) -> tuple[np.ndarray, Path]:
        """(embedding, photo used) of a subject: the first face of its first photo (by name)
        in which MTCNN finds a face."""
        for photo in sorted(photos):
            image = read_rgb(photo)
            faces = self.detect(image)
            if faces:
                return self.recognizer.embed_faces(image, faces[:1])[0], photo
            log(f"[score] facenet: no face found in reference {photo}; trying the subject's next photo")
        raise NoFaceError(f"MTCNN found no face in any reference photo of this subject "
                          f"({', '.join(map(str, photos))}); add a photo with a clear, frontal face", 0)
