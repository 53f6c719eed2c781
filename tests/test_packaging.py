"""The pack's metadata as ComfyUI and its Registry read it."""
from conftest import REPO


def test_comfyui_reads_the_registry_fields_from_pyproject():
    from comfy_config import config_parser

    config = config_parser.extract_node_configuration(str(REPO))
    assert config is not None
    assert config.project.name == "comfyui-portraitbooth"
    assert config.tool_comfy.publisher_id == "portraitbooth"
    assert config.tool_comfy.display_name == "PortraitBooth"
    assert "GNU GENERAL PUBLIC LICENSE\n                       Version 3" in (REPO / "LICENSE").read_text()


def test_runtime_requirements_match_pyproject_dependencies():
    import tomllib

    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    listed = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert sorted(declared) == sorted(listed)


def test_importing_the_pack_pulls_in_no_optional_dependency():
    import subprocess
    import sys

    # Load the pack and its node list in a fresh interpreter and list what got imported.
    probe = f"""
import sys, asyncio, importlib.util
sys.path.insert(0, {str(REPO)!r})
from headless.comfyui import import_comfyui
import_comfyui()
spec = importlib.util.spec_from_file_location("pb_pack", {str(REPO / '__init__.py')!r},
                                              submodule_search_locations=[{str(REPO)!r}])
mod = importlib.util.module_from_spec(spec); sys.modules["pb_pack"] = mod; spec.loader.exec_module(mod)
ext = asyncio.run(mod.comfy_entrypoint()); asyncio.run(ext.get_node_list())
heavy = ["onnxruntime", "cv2", "retinaface", "onnx", "onnx2torch", "facexlib", "dlib", "insightface"]
print("IMPORTED:" + ",".join(m for m in heavy if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    imported = [line for line in out.stdout.splitlines() if line.startswith("IMPORTED:")]
    assert imported == ["IMPORTED:"], f"imported while loading the pack: {imported}"
