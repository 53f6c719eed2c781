"""Importing the face core (as the nodes do at ComfyUI start-up) loads no optional backend."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_face_package_import_is_light():
    code = ("import sys; import portraitbooth_core.face; "
            "print(sorted(m for m in ('onnxruntime', 'cv2', 'dlib', 'facexlib', 'onnx2torch', 'onnx', 'retinaface', 'insightface') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_cpu_fallback_notice_is_given_once(monkeypatch, caplog):
    import onnxruntime as ort

    from portraitbooth_core.face import runtime

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    monkeypatch.setattr(runtime, "_cpu_notice_given", False)
    with caplog.at_level("WARNING", logger="portraitbooth.face"):
        assert runtime.resolve_providers("auto") == ["CPUExecutionProvider"]
        runtime.resolve_providers("auto")
    notices = [r for r in caplog.records if "no CUDA provider" in r.getMessage()]
    assert len(notices) == 1 and "onnxruntime-gpu" in notices[0].getMessage()
