"""Fixtures every test shares: ComfyUI in-process, stand-in models, photos, a real server.

The host (ComfyUI + venv) comes from `bash scripts/setup_host.sh`, which the README's
test command runs first; COMFYUI_PATH selects a user's own ComfyUI instead.

A test run owns its state: ComfyUI in-process and every server see SESSION_BASE, a folder of
this session, as ComfyUI's base (models/, input/, output/, temp/, user/), and each server
keeps its own input/output/temp/user in its work dir. Nothing lands in the host's state
folders, and nothing there (a user's settings, an earlier run's files) changes a result;
test_host_state.py checks both.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # 2 shared cores: oversubscription is 100x slower

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from headless import comfyui as host  # noqa: E402
from headless.server import ComfyServer  # noqa: E402

# ComfyUI's folders that hold a user's state, not its code.
HOST_STATE_FOLDERS = ("user", "models", "input", "output", "temp")


def host_state(comfy: Path) -> dict[str, tuple]:
    """{path: (kind, size, mtime_ns)} of every entry under `comfy`'s state folders, the
    folders themselves included (a missing one maps to "missing"). Directory mtimes catch a
    file written and deleted again; symlinks are recorded, not followed."""
    state: dict[str, tuple] = {}
    for name in HOST_STATE_FOLDERS:
        root = comfy / name
        if not os.path.lexists(root):
            state[name] = ("missing",)
            continue
        for path in [root, *sorted(root.rglob("*"))]:
            st = path.lstat()
            kind = "link" if path.is_symlink() else "dir" if path.is_dir() else "file"
            state[str(path.relative_to(comfy))] = (kind, st.st_size if kind == "file" else 0, st.st_mtime_ns)
    return state


# Taken before anything of ComfyUI is imported: test_host_state.py compares the end state.
HOST_STATE_AT_START = host_state(host.comfyui_dir())

SESSION_BASE = Path(tempfile.mkdtemp(prefix="pb-test-comfyui-"))
MODELS_DIR = SESSION_BASE / "models"
COMFY_DIR = host.import_comfyui(cpu=os.environ.get("PORTRAITBOOTH_TEST_GPU") != "1")
import comfy.cli_args  # noqa: E402

if "folder_paths" in sys.modules:  # it reads the base folder once, at import
    raise RuntimeError("folder_paths was imported before tests/conftest.py could point it at the session's folder")
comfy.cli_args.args.base_directory = str(SESSION_BASE)
ARTIFACTS = REPO / "test-artifacts"
TEST_CHECKPOINT = "portraitbooth_test_sd15.safetensors"

import torch  # noqa: E402

torch.set_num_threads(1)


def pytest_collection_modifyitems(items) -> None:
    """Tests whose function has `runs_last = True` (the host state check) run after all others."""
    items.sort(key=lambda item: getattr(getattr(item, "function", None), "runs_last", False))


def pytest_unconfigure(config) -> None:
    shutil.rmtree(SESSION_BASE, ignore_errors=True)


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def photos_dir() -> Path:
    """Real face photos extracted from registry packages by scripts/fetch_photos.py."""
    path = host.photos_dir()
    if not (path / "astronaut.png").is_file():
        pytest.fail(f"No test photos in {path}: run `bash scripts/setup_host.sh`.")
    return path


@pytest.fixture(scope="session")
def sd15_checkpoint() -> str:
    """Name of a random-weight SD1.5 checkpoint in the session's models/checkpoints/ (the
    path: MODELS_DIR / "checkpoints" / name). Built once into the host's cache, where it is
    rebuilt when its recipe changes, and copied: a test may not change the cached file."""
    from standins.sd15 import build_sd15_checkpoint

    cached = build_sd15_checkpoint(host.host_dir() / "cache" / "standins" / TEST_CHECKPOINT)
    (MODELS_DIR / "checkpoints").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(cached, MODELS_DIR / "checkpoints" / TEST_CHECKPOINT)
    return TEST_CHECKPOINT


@pytest.fixture(scope="session")
def tiny_model():
    """A small SD1.5 ModelPatcher on the CPU (random weights), loaded the way ComfyUI does."""
    from standins.sd15 import tiny_model_patcher

    return tiny_model_patcher(seed=0)


def started_server(workdir: Path, **kwargs) -> ComfyServer:
    """A running ComfyUI with the pack on the session's models (SESSION_BASE), or a test
    failure showing the server log's tail.

    The caller stops it (ComfyServer.stop ends its whole process group).
    """
    server = ComfyServer(workdir, python=sys.executable, base_dir=SESSION_BASE, **kwargs)
    try:
        server.start()
    except Exception as exc:
        pytest.fail(str(exc), pytrace=False)
    return server


@pytest.fixture(scope="session")
def comfy_server(tmp_path_factory, sd15_checkpoint):
    """One real ComfyUI with the pack for the whole session; stopped at the end."""
    server = started_server(tmp_path_factory.mktemp("comfy"))
    yield server
    server.stop()


@pytest.fixture
def comfy(comfy_server):
    """The HTTP client of the shared server."""
    return comfy_server.client


@pytest.fixture
def start_server(tmp_path):
    """Start a dedicated server (own env or model paths); each is stopped after the test."""
    started: list[ComfyServer] = []

    def start(**kwargs) -> ComfyServer:
        started.append(started_server(tmp_path / f"comfy{len(started)}", **kwargs))
        return started[-1]

    yield start
    for server in started:
        server.stop()


def load_pack():
    """The pack imported the way ComfyUI imports it (see headless.comfyui.import_node_pack)."""
    return host.import_node_pack()


@pytest.fixture(scope="session")
def pack_nodes() -> dict:
    """node_id -> V3 node class, from the pack's own comfy_entrypoint."""
    import asyncio

    extension = asyncio.run(load_pack().comfy_entrypoint())
    classes = asyncio.run(extension.get_node_list())
    return {cls.define_schema().node_id: cls for cls in classes}


@pytest.fixture(scope="session")
def pack_folder_name() -> str:
    """The name under which the test servers load the pack (see headless.server)."""
    return host.installed_pack_name(COMFY_DIR) or host.PACK_FOLDER_NAME


def default_inputs(node_info: dict) -> dict:
    """Values for a node's required inputs taken from its defaults or first choices."""
    values = {}
    for name, spec in node_info["input"].get("required", {}).items():
        kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
        if isinstance(kind, list):
            values[name] = kind[0]
        elif kind == "COMBO":
            values[name] = opts.get("default", opts["options"][0])
        elif "default" in opts:
            values[name] = opts["default"]
    return values


@pytest.fixture(scope="session")
def sd15_parts(sd15_checkpoint):
    """(model, clip, vae) of the random SD1.5 checkpoint, loaded in-process once.

    The CLIP has the real SD1.5 tokenizer and CLIP-L architecture with random weights.
    """
    import comfy.sd

    path = MODELS_DIR / "checkpoints" / sd15_checkpoint
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    return model, clip, vae


@pytest.fixture(scope="session")
def sdxl_checkpoint() -> str:
    """Name of a random-weight SDXL-family checkpoint (standins/sdxl.py: KOALA-like UNet, full
    CLIP-L and bigG, TAESD; 1.8 GB) in the session's models/checkpoints/. Built once into the
    host's cache and hard-linked there (copied where a link cannot be made): a test may
    replace the file but must not write into it."""
    from standins.sdxl import CHECKPOINT_NAME, build_sdxl_checkpoint

    cached = build_sdxl_checkpoint(host.host_dir() / "cache" / "standins" / CHECKPOINT_NAME)
    target = MODELS_DIR / "checkpoints" / CHECKPOINT_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        try:
            os.link(cached, target)
        except OSError:  # another file system, or links not allowed
            shutil.copyfile(cached, target)
    return CHECKPOINT_NAME


@pytest.fixture(scope="module")
def sdxl_parts(sdxl_checkpoint):
    """(model, clip, vae) of the random SDXL-family checkpoint, loaded in-process per test
    module (a second or two) and released after it: its full-size text encoders take several
    GB, which the servers started by later tests need more."""
    import gc

    import comfy.model_management
    import comfy.sd

    path = MODELS_DIR / "checkpoints" / sdxl_checkpoint
    model, clip, vae, *_ = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    yield model, clip, vae
    del model, clip, vae
    comfy.model_management.unload_all_models()
    gc.collect()


@pytest.fixture(scope="session")
def sdxl_photomaker_models(tmp_path_factory) -> dict[str, str]:
    """{model kind: folder} with PhotoMaker v1 and v2 stand-ins for the SDXL stand-in, imported
    by the pack's importer (portraitbooth/photomaker-v1-standin.safetensors, clip_vision/...;
    standins/sdxl.py build_sdxl_photomaker_models); the releases are cached in the host's cache."""
    from standins.sdxl import build_sdxl_photomaker_models

    return build_sdxl_photomaker_models(tmp_path_factory.mktemp("sdxl-photomaker-models"),
                                        release_cache=host.host_dir() / "cache" / "standins")


def build_insightface_pack(root: Path, pack: str) -> Path:
    """`root` laid out like models/insightface/ with one stand-in pack in buffalo_l's layout
    (det_10g, w600k_r50, genderage: tests/standins_face.py); returns `root`."""
    from standins_face import build_arcface_onnx, build_genderage_onnx, build_scrfd_onnx

    folder = root / "models" / pack
    build_scrfd_onnx(folder / "det_10g.onnx", layout="det_10g")
    build_arcface_onnx(folder / "w600k_r50.onnx", seed=2)
    build_genderage_onnx(folder / "genderage.onnx")
    return root


@pytest.fixture(scope="session")
def template_models(tmp_path_factory, sd15_checkpoint, sdxl_checkpoint, sdxl_photomaker_models) -> dict[str, str]:
    """{model kind: folder} holding every stand-in the shipped templates load (standins/templates.py):
    PortraitBooth files, a FastComposer release imported with the pack's importer, the PhotoMaker
    stand-ins (linked from sdxl_photomaker_models) and a stand-in insightface pack named
    buffalo_l (PhotoMaker v2's). Both checkpoints are in the session's models/checkpoints/."""
    from standins.templates import INSIGHTFACE_PACK, build_template_models

    folder = tmp_path_factory.mktemp("template-models")
    paths = build_template_models(folder, release_cache=host.host_dir() / "cache" / "standins",
                                  photomaker_models=sdxl_photomaker_models)
    paths["insightface"] = str(build_insightface_pack(folder / "insightface", INSIGHTFACE_PACK))
    return paths


@pytest.fixture(scope="session")
def models_server(tmp_path_factory, template_models):
    """One real ComfyUI for the whole session that sees the templates' stand-in models
    (shared by the template runs and the FastComposer tests); stopped at the end. It may
    hold the SD1.5 and the SDXL stand-ins at once: about 7 GB resident at its peak."""
    server = started_server(tmp_path_factory.mktemp("comfy-models"), extra_model_paths=template_models)
    yield server
    server.stop()


def fresh_comfyui_copy(folder: Path) -> Path:
    """A ComfyUI at `folder` as on a machine where it never ran: the host's code (linked,
    except the two files that locate ComfyUI's folders by their own path) and none of its
    state folders. Servers and commands started with COMFYUI_PATH=folder use it, so a test
    can show what a first start does without touching the shared host."""
    comfy = host.comfyui_dir()
    folder.mkdir(parents=True)
    for entry in comfy.iterdir():
        if entry.name in HOST_STATE_FOLDERS or entry.name == "__pycache__":
            continue
        if entry.name in ("main.py", "folder_paths.py"):  # base folder = dirname(realpath(__file__))
            shutil.copy2(entry, folder / entry.name)
        else:
            (folder / entry.name).symlink_to(entry)
    return folder


@pytest.fixture
def fresh_comfyui(tmp_path) -> Path:
    """A never-started ComfyUI sharing the host's code (see fresh_comfyui_copy)."""
    return fresh_comfyui_copy(tmp_path / "fresh-comfyui")
