"""Dataset builder throughput: faces analysed per second, per process, and how it scales.

`training.build.DatasetBuilder` over people folders of real registry photos (the
shipped RetinaFace detector + an ArcFace-format stand-in recognizer, crops, masks,
captions, shards: the builder's whole path), with 1, 2, 4, ... worker processes (at most
the CPUs there are). Figures: faces/s for each worker count, faces/s per process, and
the scaling ratio  faces/s(k) / (k * faces/s(1))  (1.0 = linear; target >= 0.8 where the
machine has k free cores: this project's shared 2-core machine often has not).

Times include starting the worker processes (as a real build pays once), so small runs
understate scaling. Quick mode (default): 12 people x 3 photos, a small stand-in
recognizer, on a CPU. --full: 32 people x 3 photos, an R50-sized recognizer (w600k_r50's layout), GPU provider
when onnxruntime has one.

    OMP_NUM_THREADS=1 python benchmarks/build_throughput.py [--full] [--rounds N]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")
if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png")
PER_PERSON = 3


def make_people(root: Path, count: int, photos: Path) -> int:
    """`count` person folders of PER_PERSON registry photos each (links, no copies)."""
    for p in range(count):
        person = root / f"person_{p:04d}"
        person.mkdir(parents=True)
        for k in range(PER_PERSON):
            name = PHOTOS[(p + k) % len(PHOTOS)]
            (person / f"{k}_{name}").symlink_to(photos / name)
    return count * PER_PERSON


def recognizer_pack(full: bool) -> Path:
    """An insightface-style pack folder with the stand-in recognizer, built once."""
    from benchmarks.train_standins import cache_dir
    from standins_face import build_arcface_onnx

    pack = cache_dir() / ("build_pack_r50" if full else "build_pack_small") / "standin"
    onnx = pack / "w600k_r50.onnx"
    if not onnx.is_file():
        pack.mkdir(parents=True, exist_ok=True)
        layout = {"widths": (64, 128, 256, 512), "blocks": (3, 4, 14, 3)} if full else {}
        part = onnx.with_name(onnx.name + ".part")
        build_arcface_onnx(part, **layout)
        os.replace(part, onnx)
    return pack


def build_once(source: Path, workers: int, pack: Path, provider: str) -> float:
    from training.build.settings import BuildSettings, EncoderSpec
    from training.build.builder import DatasetBuilder
    from training.build.face_crops import CropSettings

    spec = EncoderSpec(kwargs={"pack_dir": str(pack), "detector": "retinaface", "recognizer": "arcface",
                               "provider": provider})
    settings = BuildSettings(CropSettings(resolution=256), "a photo of a {word}", "man")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        report = DatasetBuilder(source, Path(tmp) / "data", spec, settings, progress=False, workers=workers).build()
        seconds = time.perf_counter() - start
    if not report.get("samples"):
        raise RuntimeError(f"the benchmark build wrote no samples: {report}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="more people, an R50-sized recognizer")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args()
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=None, path=find_comfyui())
    from benchmarks.harness import device_name, header
    from headless.comfyui import photos_dir

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    counts = [k for k in (1, 2, 4, 8) if k <= max(cpus, 2)]
    people = 32 if args.full else 12
    provider = "auto" if args.full else "cpu"
    pack = recognizer_pack(args.full)
    rounds = args.rounds or (2 if args.full else 1)
    config = {"people": people, "photos_per_person": PER_PERSON, "detector": "retinaface (shipped)",
              "recognizer": "w600k_r50-sized stand-in" if args.full else "small stand-in", "provider": provider,
              "crop_px": 256, "cpus": cpus}
    header("dataset builder: faces/s per process and scaling with processes", **config)
    with tempfile.TemporaryDirectory() as tmp:
        source = Path(tmp) / "people"
        faces = make_people(source, people, photos_dir())
        build_once(source, 1, pack, provider)  # warm-up: model files into the page cache
        times: dict[int, list[float]] = {k: [] for k in counts}
        for _ in range(rounds):  # interleaved: each round visits every worker count
            for k in counts:
                times[k].append(build_once(source, k, pack, provider))
    one = faces / statistics.median(times[1])
    for k in counts:
        rate = faces / statistics.median(times[k])
        rates = [faces / t for t in times[k]]
        print(json.dumps({
            "name": f"build_faces_per_s_{k}_workers", "value": round(rate, 2), "per_process": round(rate / k, 2),
            "scaling": round(rate / (k * one), 3), "spread": [round(min(rates), 2), round(max(rates), 2)],
            "target": ">= 0.8 scaling with free cores" if k > 1 else None, "device": device_name(),
            "config": {**config, "workers": k, "rounds": rounds, "faces": faces}}), flush=True)


if __name__ == "__main__":
    main()
