"""Identity nodes: Load PortraitBooth Model, Apply STEA Conditioning.

Thin: the weight file, projector and splice are portraitbooth_core's; the UNet patch is
applied with ComfyUI's own LoRA machinery so it stacks with any other LoRA or patch.
"""
from __future__ import annotations

import logging
import os

import folder_paths
from comfy_api.latest import io

from portraitbooth_core.stea.photomaker import PHOTOMAKER_KINDS
from portraitbooth_core.weights.family import FAMILY_NAMES, model_context_dim, require_family
from portraitbooth_core.weights.file import PortraitBoothModel, load_portraitbooth
from portraitbooth_core.weights.meta import FROM_FILE, check_schedule

from .base import CheckedNode
from .contracts import FaceEmbedding, Projector, model_defaults
from .paths import checked_model_path
from .stea_encode import as_identities, encode_with_identity
from .stea_photomaker import encode_stacked

log = logging.getLogger("portraitbooth")
CATEGORY = "PortraitBooth/identity"
FOLDER = "portraitbooth"
EXTRA_FACES = 3  # face_2 .. face_4: several subjects, one class word each

# Registering a folder is a dict update: cheap enough for import time, and it lets the
# loader's file list (and extra_model_paths.yaml entries) work before any node runs.
if FOLDER not in folder_paths.folder_names_and_paths:
    folder_paths.add_model_folder_path(FOLDER, os.path.join(folder_paths.models_dir, FOLDER), is_default=True)
if isinstance(folder_paths.folder_names_and_paths[FOLDER][1], set):
    folder_paths.folder_names_and_paths[FOLDER][1].add(".safetensors")

_cache: dict[str, tuple[tuple[float, int], PortraitBoothModel]] = {}


def load_cached(path: str) -> PortraitBoothModel:
    """Load once per file version: re-running a graph should not re-read the file."""
    stat = os.stat(path)
    key = (stat.st_mtime, stat.st_size)
    hit = _cache.get(path)
    if hit is None or hit[0] != key:
        _cache[path] = (key, load_portraitbooth(path))
    return _cache[path][1]


def apply_unet_patch(model, patch: dict, strength: float, base: str = "sd15"):
    """A clone of `model` with the patch added the way LoraLoaderModelOnly adds a LoRA."""
    import comfy.lora
    import comfy.lora_convert

    if not patch or strength == 0:
        return model
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    loaded = comfy.lora.load_lora(comfy.lora_convert.convert_lora(dict(patch)), key_map, log_missing=False)
    patched = model.clone()
    applied = set(patched.add_patches(loaded, strength))
    unmatched = sorted(set(loaded) - applied)
    if not loaded or unmatched:
        raise ValueError(f"the PortraitBooth UNet patch does not fit this MODEL ({len(unmatched) or len(patch)} "
                         f"tensors unmatched, e.g. {(unmatched or sorted(patch))[:3]}); is the MODEL "
                         f"{FAMILY_NAMES.get(base, base)}, as the file is?")
    return patched


class LoadPortraitBoothModel(CheckedNode):
    FILE_COMBOS = {"portraitbooth_name": (FOLDER, "PortraitBooth .safetensors")}

    @classmethod
    def define_schema(cls) -> io.Schema:
        folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
        return io.Schema(
            node_id="PortraitBoothLoadModel",
            display_name="Load PortraitBooth Model",
            category=CATEGORY,
            description="Loads a PortraitBooth weight file: patches the UNet (as a LoRA) and "
                        "outputs the STEA projector for Apply STEA Conditioning, with the settings the "
                        "file stores (identity start, CFG hint, identity kind) for its 'from file' inputs.",
            inputs=[
                io.Model.Input("model", tooltip="The diffusion model the file is made for: SD1.5 for PortraitBooth "
                                                "and FastComposer files, SDXL for PhotoMaker's; it is cloned, never "
                                                "modified."),
                io.Combo.Input("portraitbooth_name", options=folder_paths.get_filename_list(FOLDER),
                               tooltip=f"PortraitBooth .safetensors file from {folders}."),
                io.Float.Input("strength", default=1.0, min=-10.0, max=10.0, step=0.01,
                               tooltip="Strength of the UNet patch (like a LoRA's strength_model); "
                                       "0 leaves the model untouched."),
            ],
            outputs=[io.Model.Output(display_name="MODEL"), Projector.Output(display_name="projector")],
        )

    @classmethod
    def execute(cls, model, portraitbooth_name, strength) -> io.NodeOutput:
        path = folder_paths.get_full_path(FOLDER, portraitbooth_name) if portraitbooth_name else None
        if path is None:
            folders = ", ".join(folder_paths.get_folder_paths(FOLDER))
            raise FileNotFoundError(f"PortraitBooth file {portraitbooth_name!r} not found; put PortraitBooth "
                                    f".safetensors files in {folders}.")
        checked_model_path(path, "portraitbooth_name", portraitbooth_name)  # listed, but a link out is refused
        pb = load_cached(path)
        # Checked for projector-only files too: the projector's token fits one family's text
        # context, and another MODEL would otherwise fail later in KSampler with a bare shape error.
        require_family(model_context_dim(model), pb.info.base, "the MODEL input", portraitbooth_name)
        # The defaults travel inside the projector output; shown here so a user sees what
        # "from file" will mean before looking at Apply STEA.
        text = f"{portraitbooth_name}: {model_defaults(pb).describe()}"
        return io.NodeOutput(apply_unet_patch(model, pb.unet_patch, strength, pb.info.base), pb,
                             ui={"text": [text]})


class ApplySTEAConditioning(CheckedNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        extra = [FaceEmbedding.Input(f"face_{n}", optional=True,
                                     tooltip=f"Identity of subject {n}: goes to the {n}. class word in the prompt.")
                 for n in range(2, 2 + EXTRA_FACES)]
        return io.Schema(
            node_id="PortraitBoothApplySTEA",
            display_name="Apply STEA Conditioning",
            category=CATEGORY,
            description="Encodes the prompt like CLIP Text Encode, then replaces the class word's embedding "
                        "('man', 'woman', ...) with one that carries the face's identity.",
            inputs=[
                io.Clip.Input("clip", tooltip="The checkpoint's CLIP: SD1.5's for PortraitBooth and FastComposer files, "
                                              "SDXL's (both text encoders) for PhotoMaker files."),
                Projector.Input("projector", tooltip="From Load PortraitBooth Model."),
                FaceEmbedding.Input("face", tooltip="Identity of the first subject (from Analyze Faces; for a "
                                                    "FastComposer file, from CLIP Vision Identity); a list of "
                                                    "identities counts as several subjects."),
                io.String.Input("text", multiline=True, dynamic_prompts=True, default="a photo of a man, portrait",
                                tooltip="The prompt. It must contain a class word (man, woman, person, ...) per "
                                        "subject; weights like (man:1.2) and long prompts work. PhotoMaker's "
                                        "trigger 'img' after a class word ('a man img') is accepted and removed; "
                                        "with triggers, the class words they follow are the subjects."),
                io.String.Input("class_word", default="",
                                tooltip="Empty: any class word the model knows. Or restrict to words, comma "
                                        "separated, e.g. 'woman'. 'auto': the words that fit each face's "
                                        "gender as the pack's gender/age model estimated it (woman, girl, "
                                        "lady, ... or man, boy, ...; 'person' always fits)."),
                io.Int.Input("occurrence", default=0, min=0, max=64,
                             tooltip="0: subjects take the first class words in prompt order. k: start at the "
                                     "k-th occurrence (e.g. 2 = the second 'man')."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.01,
                               tooltip="Identity strength: 0 gives exactly the plain text encoding."),
                io.Float.Input("start_percent", default=FROM_FILE, min=FROM_FILE, max=1.0, step=0.001,
                               tooltip="Identity from this point of the schedule on; plain text before "
                                       "(delaying it keeps the prompt's layout editable). -1 (any value "
                                       "below 0): from the file, the start its PortraitBooth file stores "
                                       "(FastComposer's: 0.3), or 0.0 (the paper's) if it stores none; the "
                                       "node's text says which value it used."),
                io.Float.Input("end_percent", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Identity until this point of the schedule; plain text after."),
                *extra,
            ],
            outputs=[io.Conditioning.Output(display_name="CONDITIONING")],
        )

    @classmethod
    def execute(cls, clip, projector, face, text, class_word, occurrence, strength, start_percent,
                end_percent, face_2=None, face_3=None, face_4=None) -> io.NodeOutput:
        defaults = model_defaults(projector)
        start, origin = defaults.inference.start_percent_for(start_percent)
        try:
            check_schedule(start, end_percent, f" ({origin})")
        except ValueError as exc:
            raise ValueError(f"start_percent/end_percent: {exc}; raise end_percent or set start_percent below "
                             f"it") from None
        faces = as_identities(face, face_2, face_3, face_4)
        encode = encode_stacked if projector.info.projector.kind in PHOTOMAKER_KINDS else encode_with_identity
        conditioning = encode(clip, text, faces, projector, class_word, occurrence, strength, start, end_percent)
        used = f"identity from start {start:.2f} ({origin}) to end {end_percent:.2f}"
        if defaults.inference.cfg is not None:
            used += f"; {defaults.file} suggests CFG {defaults.inference.cfg:g} in the sampler"
        log.info("PortraitBooth: Apply STEA Conditioning: %s", used)
        return io.NodeOutput(conditioning, ui={"text": [used]})


NODES = [LoadPortraitBoothModel, ApplySTEAConditioning]
