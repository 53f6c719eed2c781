"""A fast stand-in face encoder and generated people for the builder's scale tests.

The encoder is the real FaceEncoder class with a detector and a recognizer that answer
from the generated images' pixels in microseconds, so thousands of people build in
seconds while the builder runs its real path (face crops, alignment, masks, captions,
shards, journal, worker processes). Each image carries its person's number in its first
row; the detector appends it to the file named by STANDIN_FACE_LOG (one line per
detection, from any process), and kills the process STANDIN_KILL_PID when it sees
person STANDIN_KILL_AT: a test's way to stop a build at a known point.
"""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np

from portraitbooth_core.face.align import align_face
from portraitbooth_core.face.encoder import FaceEncoder
from portraitbooth_core.face.types import DetectedFace

SIDE = 40          # generated image side
FACE = (9, 8, 29, 30)  # x1, y1, x2, y2 of the drawn face
LANDMARKS = np.array([[0.3, 0.35], [0.7, 0.35], [0.5, 0.55], [0.35, 0.75], [0.65, 0.75]], np.float32)


def person_image(index: int, photo: int, face: bool = True) -> np.ndarray:
    """A SIDE x SIDE RGB image: a dim background varying by person and photo, a bright
    square "face" (shifted a little per photo), the person's number in row 0."""
    rng = np.random.default_rng(index * 16 + photo)
    # flat colours: the PNGs the builder writes compress fast (noise would make encoding the test's cost)
    image = np.empty((SIDE, SIDE, 3), np.uint8)
    image[:] = rng.integers(0, 120, 3, dtype=np.uint8)
    if face:
        x1, y1, x2, y2 = FACE
        dx = photo % 3
        image[y1:y2, x1 + dx:x2 + dx] = rng.integers(200, 256, 3, dtype=np.uint8)
    image[0] = 0
    image[0, 0] = [index % 256, index // 256 % 256, index // 65536 % 256]
    return image


def image_person(image: np.ndarray) -> int:
    r, g, b = (int(v) for v in image[0, 0])
    return r + 256 * g + 65536 * b


class StandinDetector:
    name = "standin detector (bright square)"

    def detect(self, image: np.ndarray, threshold: float = 0.5) -> list[DetectedFace]:
        ys, xs = np.nonzero(image[1:, :, 1] >= 200)
        if not len(xs):
            return []
        x1, y1, x2, y2 = float(xs.min()), float(ys.min() + 1), float(xs.max() + 1), float(ys.max() + 2)
        size = np.array([x2 - x1, y2 - y1], np.float32)
        landmarks = np.array([x1, y1], np.float32) + LANDMARKS * size
        return [DetectedFace(np.array([x1, y1, x2, y2], np.float32), 0.99, landmarks)]


class StandinRecognizer:
    """[N, 112, 112, 3] aligned crops -> [N, 32]: 8x8 mean pooling and a fixed projection."""

    kind = "standin:pool-proj32"
    name = kind
    dim = 32
    input_size = 112
    same_person_cosine = 0.5

    def __init__(self):
        self.projection = np.random.default_rng(0).normal(0, 1, (8 * 8 * 3, self.dim)).astype(np.float32)
        self.calls: list[int] = []  # batch size of every call

    def embed(self, crops: np.ndarray) -> np.ndarray:
        crops = np.asarray(crops, np.float32)
        self.calls.append(len(crops))
        pooled = crops.reshape(len(crops), 8, 14, 8, 14, 3).mean(axis=(2, 4)).reshape(len(crops), -1) / 255.0
        return pooled @ self.projection

    def embed_faces(self, image: np.ndarray, faces: list[DetectedFace]) -> np.ndarray:
        return self.embed(np.stack([align_face(image, f.landmarks, self.input_size) for f in faces]))


class StandinEncoder(FaceEncoder):
    """FaceEncoder whose detect reads the image as written (no detection resize: the
    person's number must survive) and reports every detection."""

    def detect(self, image: np.ndarray, threshold: float) -> list[DetectedFace]:
        index = image_person(image)
        log = os.environ.get("STANDIN_FACE_LOG")
        if log:
            with open(log, "a") as f:
                f.write(f"{index}\n")
        if os.environ.get("STANDIN_KILL_AT") == str(index):
            os.kill(int(os.environ["STANDIN_KILL_PID"]), signal.SIGKILL)
        return self.detector.detect(image, threshold)


def make_encoder() -> StandinEncoder:
    """The EncoderSpec factory: tests.build_standins:make_encoder."""
    return StandinEncoder(StandinDetector(), StandinRecognizer(), None, "fallback ellipse (stand-in)",
                          {"pack": None, "detector": "standin", "recognizer": "standin",
                           "recognizer_kind": StandinRecognizer.kind, "provider": "cpu", "det_size": SIDE,
                           "masks": "fallback"})


CAPTIONS = ("a smiling woman at the beach", "a photo of a man", "portrait of a happy guy", "a lady laughing",
            "a serious gentleman", "a photo of a cat")  # the last names no class word: skipped


def make_people(root: Path, count: int) -> Path:
    """`count` person folders p00000.. with one to three photos each (1.19 on average): captions by sidecar,
    class.txt or template; the second photo of p00106, p00242, ... (every 136th) has no face, every 31st person
    has a corrupt file, every 50th folder is empty, every 7th caption names no class word."""
    from PIL import Image

    for i in range(count):
        folder = root / f"p{i:05d}"
        folder.mkdir(parents=True)
        if i % 50 == 49:
            continue  # a folder without photos: not a person
        photos = 1 + (i % 8 == 2) + (i % 16 == 2)  # mostly one: cheap people, many of them
        for k in range(photos):
            Image.fromarray(person_image(i, k, face=not (i % 136 == 106 and k == 1))).save(folder / f"{k}.png")
            if (i + k) % 2 == 0:
                (folder / f"{k}.txt").write_text(CAPTIONS[(i + k) % len(CAPTIONS)] if (i + k) % 7 else CAPTIONS[-1])
        if i % 5 != 1:  # the others caption by sidecar, or are skipped: no class word for the template
            (folder / "class.txt").write_text("woman" if i % 2 else "man")
        if i % 31 == 5:
            (folder / "broken.jpg").write_bytes(b"not an image")
    return root


def scale_settings(**overrides):
    """The build settings of the scale tests: 32 px crops of the generated 40 px images."""
    from training.build.settings import BuildSettings
    from training.build.face_crops import CropSettings

    base = {"caption_template": "a photo of a {word}", "shard_size": 40}
    return BuildSettings(CropSettings(resolution=32, crop_scale=1.5, min_face=8), **{**base, **overrides})


ENCODER_FACTORY = "build_standins:make_encoder"
