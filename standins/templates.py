"""Stand-ins for the shipped templates (workflows/api/*.json): the model files their loaders
name, the photos their Load Image nodes get, and the small sizes that make a run cheap.

Shared by the test that runs every template through the HTTP API and by
`python tests/frontend.py pictures` (the README's attention-map picture), so both run the
templates exactly as shipped apart from the names and sizes set here.
"""
from __future__ import annotations

from pathlib import Path

# For the zero-download face encoder every PortraitBooth template defaults to (RetinaFace +
# dlib, 128-d).
WEIGHTS = "portraitbooth_templates_standin.safetensors"
# A face-recognizer projector (ArcFace kind), for the FastComposer tests' kind-mismatch case.
ARCFACE_FILE = "portraitbooth_arcface_standin.safetensors"
ARCFACE_KIND = "arcface:standin_r50/w600k_r50.onnx"
# FastComposer's import writes the names its templates already use; they need no change.
FASTCOMPOSER_RELEASE = "fastcomposer_vitl_v1.bin"  # versioned: a new stand-in layout gets a new file
# Photos (from scripts/fetch_photos.py) for the Load Image nodes in id order, cycled.
DEFAULT_PHOTOS = ("obama.jpg", "biden.jpg")
PHOTOS = {"portraitbooth_several_photos": ("obama.jpg", "obama2.jpg", "obama3.jpg"),
          "portraitbooth_identity_save": ("obama.jpg", "obama2.jpg")}
# Load Identity reads what Save Identity wrote: the save template runs first.
RUNS_AFTER = {"portraitbooth_identity_load": "portraitbooth_identity_save"}
# portraitbooth_identities: Save Identity writes here, never into the host's models/.
MODEL_KINDS = ("portraitbooth", "diffusion_models", "clip_vision", "portraitbooth_identities")


def build_template_models(models: Path, release_cache: Path | None = None) -> dict[str, str]:
    """Write the stand-in model files into `models/<kind>/`; returns {kind: folder} for
    ComfyServer's extra_model_paths. release_cache: folder of the cached FastComposer
    stand-in release; None leaves FastComposer out (no template of it can run then)."""
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
    return {kind: str(models / kind) for kind in MODEL_KINDS if (models / kind).is_dir()}


def template_photos(name: str) -> tuple[str, ...]:
    return PHOTOS.get(name, DEFAULT_PHOTOS)


def standin_graph(name: str, checkpoint: str, photos: dict[str, str], short_side: int = 64, steps: int = 2,
                  batch: int = 2) -> dict:
    """Template `name` with the stand-ins: `checkpoint` for every SD1.5 checkpoint, WEIGHTS for
    every PortraitBooth file except FastComposer's, the uploaded `photos` ({file: name in
    ComfyUI's input}) for its Load Image nodes, latents of `short_side` px, `steps` steps and
    batches of at most `batch`."""
    from headless.workflows import load_api_workflow, load_image_nodes, sized_down, with_class_inputs, with_inputs

    graph = load_api_workflow(name)
    graph = with_class_inputs(graph, {"CheckpointLoaderSimple": {"ckpt_name": checkpoint}})
    for node in graph.values():
        if node["class_type"] == "PortraitBoothLoadModel" \
                and not node["inputs"]["portraitbooth_name"].startswith("fastcomposer"):
            node["inputs"]["portraitbooth_name"] = WEIGHTS
    wanted = template_photos(name)
    graph = with_inputs(graph, {nid: {"image": photos[wanted[i % len(wanted)]]}
                                for i, nid in enumerate(load_image_nodes(graph))})
    return sized_down(graph, short_side, steps, batch)
