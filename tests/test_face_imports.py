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

