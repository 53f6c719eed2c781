"""Where face analysis runs (issue 24, item 4): onnxruntime's provider and torch's device.

'auto' takes CUDA when onnxruntime offers it. A GPU machine with the CPU-only onnxruntime
wheel is told once per process, in the console, and in every Analyze Faces report, with
the command that installs the GPU build; a CPU-only machine and an explicit 'cpu' are not
warned. The torch parts run on the device they are given (ComfyUI's, from the node).
"""
from __future__ import annotations

import logging
import sys

import pytest
import torch

from face_fixtures import *  # noqa: F401,F403
from face_fixtures import read_photo

CPU_ONLY = ["CPUExecutionProvider"]
WITH_CUDA = ["CUDAExecutionProvider", "CPUExecutionProvider"]
INSTALL = f"{sys.executable} -m pip uninstall -y onnxruntime && {sys.executable} -m pip install onnxruntime-gpu"


@pytest.fixture
def machine(monkeypatch):
    """machine(gpu=..., providers=...): what torch and onnxruntime report, with the
    once-per-process notice not yet given."""
    import onnxruntime as ort

    from portraitbooth_core.face import runtime

    def set_up(gpu: bool, providers: list[str], cuda: str | None = "12.4"):
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(providers))
        monkeypatch.setattr(torch.cuda, "is_available", lambda: gpu)
        monkeypatch.setattr(torch.version, "cuda", cuda if gpu else None)
        monkeypatch.setattr(runtime, "_cpu_notice_given", False)
        return runtime
    return set_up


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and r.name == "portraitbooth.face"]


def test_auto_picks_cuda_when_onnxruntime_offers_it(machine, caplog):
    runtime = machine(gpu=True, providers=WITH_CUDA)
    with caplog.at_level(logging.INFO, logger="portraitbooth.face"):
        assert runtime.resolve_providers("auto") == WITH_CUDA
        assert runtime.resolve_providers("cuda") == WITH_CUDA
    assert runtime.resolve_providers("cpu") == CPU_ONLY
    assert warnings_of(caplog) == [] and runtime.cpu_fallback_notice("auto") == ""


def test_gpu_machine_with_cpu_only_onnxruntime_warns_once_with_the_install_line(machine, caplog):
    runtime = machine(gpu=True, providers=CPU_ONLY)
    with caplog.at_level(logging.INFO, logger="portraitbooth.face"):
        for _ in range(3):
            assert runtime.resolve_providers("auto") == CPU_ONLY
    notices = warnings_of(caplog)
    assert len(notices) == 1
    assert "no CUDA provider" in notices[0] and "CUDA 12.4" in notices[0] and INSTALL in notices[0]


def test_the_install_line_matches_torchs_cuda(machine):
    runtime = machine(gpu=True, providers=CPU_ONLY, cuda="11.8")
    assert runtime.cpu_fallback_notice("auto").endswith(
        f"{INSTALL} --extra-index-url {runtime.CUDA11_INDEX}\nthen restart ComfyUI.")
    assert runtime.gpu_install_command("12.1") == INSTALL
    with pytest.raises(RuntimeError, match="onnxruntime-cuda-11"):  # asking for 'cuda' names the same fix
        runtime.resolve_providers("cuda")


def test_cpu_only_machine_is_not_warned(machine, caplog):
    runtime = machine(gpu=False, providers=CPU_ONLY)
    with caplog.at_level(logging.INFO, logger="portraitbooth.face"):
        assert runtime.resolve_providers("auto") == CPU_ONLY
        runtime.resolve_providers("auto")
    assert warnings_of(caplog) == []
    assert [r.levelno for r in caplog.records if "CPU provider" in r.getMessage()] == [logging.INFO]
    assert runtime.cpu_fallback_notice("auto") == ""


def test_explicit_cpu_provider_never_warns(machine, caplog):
    runtime = machine(gpu=True, providers=CPU_ONLY)
    with caplog.at_level(logging.INFO, logger="portraitbooth.face"):
        for _ in range(2):
            assert runtime.resolve_providers("cpu") == CPU_ONLY
    assert caplog.records == [] and runtime.cpu_fallback_notice("cpu") == ""


def _comfy_image(photos_dir) -> torch.Tensor:
    return torch.from_numpy(read_photo(photos_dir, "astronaut.png")).float().div(255)[None]


def test_analyze_faces_report_says_onnxruntime_is_on_the_cpu(pack_nodes, machine, photos_dir):
    from portraitbooth_core.face import build_encoder

    runtime = machine(gpu=True, providers=CPU_ONLY)
    encoder = build_encoder(None, provider="auto")
    node = pack_nodes["PortraitBoothAnalyzeFaces"]
    args = (_comfy_image(photos_dir), "largest", 0, "error", 0.5)
    for _ in range(2):  # in every report, not only the first
        report = node.execute(encoder, *args).result[3]
        assert report.startswith(runtime.cpu_fallback_notice("auto")) and INSTALL in report
    cpu_encoder = build_encoder(None, provider="cpu")
    assert "no CUDA provider" not in node.execute(cpu_encoder, *args).result[3]
    machine(gpu=False, providers=CPU_ONLY)
    assert "no CUDA provider" not in node.execute(encoder, *args).result[3]


def test_face_parsing_runs_on_the_device_it_is_given(tmp_path):
    from portraitbooth_core.face import build_encoder
    from portraitbooth_core.face.parsing import LABELS
    from standins_face import build_bisenet_state

    weights = build_bisenet_state(tmp_path / "parsing_bisenet.pth", LABELS["skin"])
    encoder = build_encoder(None, provider="cpu", parsing_weights=weights, device="meta")
    assert encoder.parser.device == torch.device("meta")
    assert {p.device.type for p in encoder.parser.net.parameters()} == {"meta"}
    assert build_encoder(None, provider="cpu", parsing_weights=weights).parser.device == torch.device("cpu")


def test_load_face_encoder_hands_comfyuis_torch_device_to_the_core(pack_nodes, monkeypatch):
    import importlib

    import comfy.model_management

    node_module = importlib.import_module("portraitbooth_pack_under_test.nodes.face_analysis")
    seen = []
    monkeypatch.setattr(node_module, "build_encoder", lambda *a, **kw: seen.append(kw["device"]) or "encoder")
    monkeypatch.setattr(comfy.model_management, "get_torch_device", lambda: torch.device("meta"))
    node = pack_nodes["PortraitBoothLoadFaceEncoder"]
    for provider in ("auto", "cpu"):
        node.execute(node_module.NO_PACK, "auto", "auto", provider, 640, False, False, False)
    assert seen == [torch.device("meta"), "cpu"]


def test_torch_recognizer_moves_to_the_given_device_and_takes_cpu_crops(insightface_root):
    from portraitbooth_core.face.arcface_torch import TorchArcFace

    model = TorchArcFace(insightface_root / "models" / "standin_r50" / "w600k_r50.onnx", device="meta")
    assert {t.device.type for t in [*model.parameters(), *model.buffers()]} == {"meta"}
    raw, normalized = model.forward_all(torch.rand(2, 3, 112, 112))  # CPU crops in
    assert raw.device.type == normalized.device.type == "meta" and raw.shape[0] == 2
