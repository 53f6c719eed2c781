"""The pack's shape inside ComfyUI's process: no generic global module names, a core that
imports without ComfyUI, and a second pack with its own `training`/`evaluation` beside it."""
from __future__ import annotations

import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import COMFY_DIR, MODELS_DIR, REPO, SESSION_BASE, TEST_CHECKPOINT
from training_fixtures import *  # noqa: F401,F403

GENERIC = ("training", "evaluation", "evidence", "headless", "standins", "benchmarks", "comfy_host")


def run_python(code: str, cwd: Path, path: list[str]) -> dict:
    """Run `code` in a fresh interpreter whose sys.path holds only `path` (plus the
    standard library and site-packages), and return the JSON it prints last."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_core_imports_without_comfyui_on_sys_path(tmp_path):
    """Every module of portraitbooth_core imports with only the repository on sys.path: no
    ComfyUI, no folder_paths, no comfy_api."""
    modules = sorted(m.name for m in pkgutil.walk_packages([str(REPO / "portraitbooth_core")], "portraitbooth_core."))
    assert {"portraitbooth_core.ecac.loss", "portraitbooth_core.dip.identity_loss",
            "portraitbooth_core.stea.projector", "portraitbooth_core.regions.multidiffusion"} <= set(modules)
    code = f"""
import importlib, json, sys
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps({{"comfy": sorted(m for m in sys.modules if m.split(".")[0] in
                   ("comfy", "folder_paths", "comfy_api", "nodes", "comfy_extras"))}}))
"""
    result = run_python(code, tmp_path, [str(REPO)])
    assert result["comfy"] == []


def test_loading_the_pack_adds_no_generic_module_names(tmp_path):
    """Imported the way ComfyUI imports a custom node folder, the pack leaves sys.path as it
    was and makes none of its generic folder names importable; only its unique core name."""
    code = f"""
import importlib.util, json, sys
sys.path.insert(0, {str(COMFY_DIR)!r})
import comfy.options; comfy.options.enable_args_parsing(False)
import comfy.cli_args; comfy.cli_args.args.cpu = True
comfy.cli_args.args.base_directory = {str(SESSION_BASE)!r}  # not the host's folders
before = list(sys.path)
name = {str(REPO).replace(".", "_x_")!r}
spec = importlib.util.spec_from_file_location(name, {str(REPO / "__init__.py")!r})
module = importlib.util.module_from_spec(spec); sys.modules[name] = module
spec.loader.exec_module(module)
import asyncio
ext = asyncio.run(module.comfy_entrypoint())
nodes = [c.define_schema().node_id for c in asyncio.run(ext.get_node_list())]
print(json.dumps({{"path_same": sys.path == before, "nodes": len(nodes),
                   "importable": [g for g in {GENERIC!r} if importlib.util.find_spec(g) is not None],
                   "core": sys.modules["portraitbooth_core"].__file__}}))
"""
    result = run_python(code, tmp_path, [])
    assert result["path_same"] and result["nodes"] >= 10
    assert result["importable"] == []
    assert Path(result["core"]).resolve() == (REPO / "portraitbooth_core" / "__init__.py").resolve()


FAKE_INIT = '''"""A stand-in for another custom node pack that puts its folder on sys.path and owns
top-level modules named `training` and `evaluation` (as several real packs do)."""
import os, sys
sys.path.append(os.path.dirname(os.path.abspath(__file__)))
from comfy_api.latest import ComfyExtension, io


class Probe(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="FakePackProbe", display_name="Fake pack probe", category="testing",
                         inputs=[io.Int.Input("seed", default=0)], outputs=[io.String.Output()],
                         is_output_node=True)

    @classmethod
    def execute(cls, seed):
        import evaluation
        import training
        text = f"{training.OWNER}/{evaluation.OWNER}"
        return io.NodeOutput(text, ui={"text": [text]})


class Extension(ComfyExtension):
    async def get_node_list(self):
        return [Probe]


async def comfy_entrypoint():
    return Extension()
'''


@pytest.mark.slow  # own server: ~13 s
def test_a_second_pack_with_its_own_training_and_evaluation_modules_works_beside_ours(
        start_server, dataset_dir, sd15_checkpoint, tmp_path):
    folder = tmp_path / "other_packs"
    pack = folder / "FakeTrainingPack"
    for sub in ("training", "evaluation"):
        (pack / sub).mkdir(parents=True)
        (pack / sub / "__init__.py").write_text('OWNER = "fake-pack"\n')
    (pack / "__init__.py").write_text(FAKE_INIT)
    server = start_server(custom_node_dirs=[folder])
    info = server.client.get_json("/object_info")
    assert "FakePackProbe" in info and "PortraitBoothDIPTrainer" in info and "PortraitBoothApplySTEA" in info
    import shutil

    shutil.copytree(dataset_dir, server.input_dir / "faces")
    name = f"isolation_{os.getpid()}"
    target = MODELS_DIR / "portraitbooth" / f"{name}.safetensors"
    graph = {
        "1": {"class_type": "FakePackProbe", "inputs": {"seed": 1}},
        "2": {"class_type": "PortraitBoothDIPTrainer", "inputs": {
            "ckpt_name": TEST_CHECKPOINT, "dataset": "faces", "run_name": name, "output_name": name,
            "mode": "lora", "steps": 1, "batch_size": 1, "grad_accum": 1, "learning_rate": 1e-3,
            "lora_rank": 4, "save_every": 1, "seed": 0, "gradient_checkpointing": False,
            # the stand-in recognizer is not under the server's models: say so, DIP off
            "extra_settings": "id_weight=0"}},
        "3": {"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}},
    }
    try:
        result = server.client.run(graph, timeout=600)
        assert result.outputs["1"]["text"] == ["fake-pack/fake-pack"]  # their modules, not ours
        assert len(result.images("3")) == 1 and target.is_file()    # our training, not theirs
    finally:
        target.unlink(missing_ok=True)
