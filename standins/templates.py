"""Stand-ins for the shipped templates (workflows/api/*.json): the model files their loaders
name, the photos their Load Image nodes get, and the small sizes that make a run cheap.
Templates whose name holds SDXL_TEMPLATE_MARK (PhotoMaker's) run on the SDXL stand-in and
its PhotoMaker stand-ins; the others on SD1.5.

Shared by the test that runs every template through the HTTP API and by
`python tests/frontend.py pictures` (the README's attention-map picture), so both run the
templates exactly as shipped apart from the names and sizes set here.
"""
from __future__ import annotations

from pathlib import Path

from .sdxl import CHECKPOINT_NAME as SDXL_CHECKPOINT, PHOTOMAKER_NAMES

# For the zero-download face encoder every PortraitBooth template defaults to (RetinaFace +
# dlib, 128-d).
WEIGHTS = "portraitbooth_templates_standin.safetensors"
# A face-recognizer projector (ArcFace kind), for the FastComposer tests' kind-mismatch case.
ARCFACE_FILE = "portraitbooth_arcface_standin.safetensors"
ARCFACE_KIND = "arcface:standin_r50/w600k_r50.onnx"
# FastComposer's import writes the names its templates already use; they need no change.
FASTCOMPOSER_RELEASE = "fastcomposer_vitl_v1.bin"  # versioned: a new stand-in layout gets a new file
# PhotoMaker's templates: SDXL. The file names its import writes -> the stand-ins' names
# (standins.sdxl imports them as photomaker-v1-standin / photomaker-v2-standin).
SDXL_TEMPLATE_MARK = "photomaker"
PHOTOMAKER_FILES = {f"photomaker_{v}.safetensors": f"{name}.safetensors" for v, name in PHOTOMAKER_NAMES.items()}
PHOTOMAKER_CLIP_VISION = {f"photomaker_{v}_clip_vit_l14.safetensors": f"{name}_clip_vit_l14.safetensors"
                          for v, name in PHOTOMAKER_NAMES.items()}
# The insightface pack PhotoMaker v2's templates load; the tests give the server a stand-in of
# it (det_10g + w600k_r50 + genderage, tests/standins_face.py).
INSIGHTFACE_PACK = "buffalo_l"
# Photos (from scripts/fetch_photos.py) for the Load Image nodes in id order, cycled.
DEFAULT_PHOTOS = ("obama.jpg", "biden.jpg")
# PhotoMaker v2 drops a photo without a face: its templates get photos in which the stand-in
# buffalo_l's detector finds "faces" (it fires on pure-white pixels, tests/standins_face.py).
# obama.jpg, obama2.jpg, obama3.jpg and biden.jpg hold such specks, also after Batch Images
# scales photos 2 and 3 to the first one's size; t1.jpg holds none.
PHOTOS = {"portraitbooth_several_photos": ("obama.jpg", "obama2.jpg", "obama3.jpg"),
          "portraitbooth_identity_save": ("obama.jpg", "obama2.jpg"),
          "portraitbooth_photomaker_v1_single_subject": ("obama.jpg", "obama2.jpg", "obama3.jpg"),
          "portraitbooth_photomaker_v2_single_subject": ("obama.jpg", "obama2.jpg", "obama3.jpg")}
# Load Identity reads what Save Identity wrote: the save template runs first.
RUNS_AFTER = {"portraitbooth_identity_load": "portraitbooth_identity_save"}
# portraitbooth_identities: Save Identity writes here, never into the host's models/.
MODEL_KINDS = ("portraitbooth", "diffusion_models", "clip_vision", "portraitbooth_identities")


def build_template_models(models: Path, release_cache: Path | None = None,
                          photomaker_models: dict[str, str] | None = None) -> dict[str, str]:
    """Write the stand-in model files into `models/<kind>/`; returns {kind: folder} for
    ComfyServer's extra_model_paths. release_cache: folder of the cached FastComposer and
    PhotoMaker stand-in releases; None leaves both out (no template of theirs can run then).
    photomaker_models: {kind: folder} of PhotoMaker stand-ins already imported
    (standins.sdxl.build_sdxl_photomaker_models), linked in instead of importing them again.
    The SDXL checkpoint and the insightface pack are the caller's (see tests/conftest.py)."""
    from .sd15 import build_portraitbooth_file

    build_portraitbooth_file(models / "portraitbooth" / WEIGHTS)
    (models / "portraitbooth_identities").mkdir(parents=True, exist_ok=True)
    build_portraitbooth_file(models / "portraitbooth" / ARCFACE_FILE, face_kind=ARCFACE_KIND, face_dim=512)
    if release_cache is not None:
        from training.__main__ import main as training_cli

        from .fastcomposer import build_fastcomposer_release

        # A full-size ViT-L/14 image encoder: the only CLIP vision size Load CLIP Vision knows.
        release = build_fastcomposer_release(release_cache / FASTCOMPOSER_RELEASE, "vit-l", seed=0)
        # Through the user's command, so the files are exactly what an import writes.
        if training_cli(["import-fastcomposer", str(release), "--models", str(models)]) != 0:
            raise RuntimeError(f"import-fastcomposer of the stand-in {release} failed (see its message above)")
    if photomaker_models is not None:
        _link_files(photomaker_models, models)
    elif release_cache is not None:
        from .sdxl import build_sdxl_photomaker_models

        build_sdxl_photomaker_models(models, release_cache)
    return {kind: str(models / kind) for kind in MODEL_KINDS if (models / kind).is_dir()}


def _link_files(folders: dict[str, str], models: Path) -> None:
    """Each file of {kind: folder} into models/<kind>/: hard links (the PhotoMaker stand-ins
    are 2 GB), copies where a link cannot be made."""
    import os
    import shutil

    for kind, folder in folders.items():
        (models / kind).mkdir(parents=True, exist_ok=True)
        for source in Path(folder).iterdir():
            target = models / kind / source.name
            if source.is_file() and not target.exists():
                try:
                    os.link(source, target)
                except OSError:  # another file system, or links not allowed
                    shutil.copyfile(source, target)


def template_photos(name: str) -> tuple[str, ...]:
    return PHOTOS.get(name, DEFAULT_PHOTOS)


def uses_sdxl(name: str) -> bool:
    return SDXL_TEMPLATE_MARK in name


def standin_graph(name: str, checkpoint: str, photos: dict[str, str], short_side: int = 64, steps: int = 2,
                  batch: int = 2, sdxl_checkpoint: str = SDXL_CHECKPOINT) -> dict:
    """Template `name` with the stand-ins: `checkpoint` for every SD1.5 checkpoint (for
    PhotoMaker's templates `sdxl_checkpoint`), WEIGHTS for every PortraitBooth file except
    FastComposer's and PhotoMaker's (those: their imported stand-ins), the uploaded `photos`
    ({file: name in ComfyUI's input}) for its Load Image nodes, latents of `short_side` px,
    `steps` steps and batches of at most `batch`."""
    from headless.workflows import load_api_workflow, load_image_nodes, sized_down, with_class_inputs, with_inputs

    graph = load_api_workflow(name)
    graph = with_class_inputs(graph, {"CheckpointLoaderSimple": {
        "ckpt_name": sdxl_checkpoint if uses_sdxl(name) else checkpoint}})
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "PortraitBoothLoadModel":
            file = inputs["portraitbooth_name"]
            if file in PHOTOMAKER_FILES:
                inputs["portraitbooth_name"] = PHOTOMAKER_FILES[file]
            elif not file.startswith("fastcomposer"):
                inputs["portraitbooth_name"] = WEIGHTS
        elif node["class_type"] == "CLIPVisionLoader" and inputs["clip_name"] in PHOTOMAKER_CLIP_VISION:
            inputs["clip_name"] = PHOTOMAKER_CLIP_VISION[inputs["clip_name"]]
    wanted = template_photos(name)
    graph = with_inputs(graph, {nid: {"image": photos[wanted[i % len(wanted)]]}
                                for i, nid in enumerate(load_image_nodes(graph))})
    return sized_down(graph, short_side, steps, batch)
