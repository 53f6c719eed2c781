"""DIP Trainer: run (or continue) PortraitBooth training from inside ComfyUI.

Thin: the training package does the work; this node checks paths, builds the config,
drives ComfyUI's progress bar and returns a loss-curve picture. Runs live in
output/portraitbooth_runs/<run_name>/ (checkpoints, metrics, validation images; the run
name defaults to the output name, so two outputs never share a run); the weight file goes
to models/portraitbooth/<output_name>.safetensors, where Load PortraitBooth Model lists
it, and never replaces an existing file unless `overwrite` is on. Every input is checked
before training starts.
"""
from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from .paths import (checked_choice, checked_inputs, checked_name, checked_path, checked_text, model_roots,
                    validate_widget_inputs)
from .stea import FOLDER

CATEGORY = "PortraitBooth/training"
RUNS = "portraitbooth_runs"
PATH_SETTINGS = {"checkpoint", "dataset", "output", "recognizer", "export_name",
                 "init_unet", "stage0_teacher", "stage0_clip_vision"}  # warm start: the CLI's (no node input yet)
MODES = ["lora", "full", "frozen"]


class DIPTrainer(io.ComfyNode):
    FILE_COMBOS = {"ckpt_name": ("checkpoints", "SD1.5 checkpoint (.safetensors)")}

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="PortraitBoothDIPTrainer",
            display_name="DIP Trainer",
            category=CATEGORY,
            description="Trains a PortraitBooth model (STEA projector + UNet patch) with the noise, localization "
                        "(ECAC) and identity (DIP) losses on a dataset built by `python -m training build`. "
                        "Continues the run of the same name when it has checkpoints.",
            inputs=[
                io.Combo.Input("ckpt_name", options=folder_paths.get_filename_list("checkpoints"),
                               tooltip="The SD1.5 checkpoint to start from."),
                io.String.Input("dataset", default="portraitbooth_dataset",
                                tooltip="Dataset folder (with index.json); relative paths are inside ComfyUI's "
                                        "input folder. Only input/output/models paths are allowed unless ComfyUI "
                                        "was started with PORTRAITBOOTH_ALLOW_ANY_PATH=1."),
                io.String.Input("run_name", default="",
                                tooltip=f"Run folder under output/{RUNS}/ (checkpoints, metrics); empty: the "
                                        "output name. An existing run is continued when its settings match."),
                io.String.Input("output_name", default="portraitbooth_trained",
                                tooltip="Weight file name written to models/portraitbooth/ (.safetensors); a plain "
                                        "name, no folders."),
                io.Combo.Input("mode", options=MODES, default="lora",
                               tooltip="What trains beside the projector: LoRA adapters, the whole UNet, or nothing."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accum", default=1, min=1, max=256),
                io.Float.Input("learning_rate", default=0.0, min=0.0, max=1e-2, step=1e-6,
                               tooltip="0: the mode's default (lora and frozen 1e-4, full 1e-5 as in the paper). "
                                       "Any other value is used as given."),
                io.Int.Input("lora_rank", default=16, min=1, max=256),
                io.Int.Input("save_every", default=100, min=1, max=100_000),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.String.Input("recognizer", default="", optional=True,
                                tooltip="ArcFace ONNX for the identity loss; empty: the dataset's recognizer, "
                                        "looked up in models/insightface/models/<pack>/. A dataset whose "
                                        "recognizer is neither found nor given stops the node before training "
                                        "(or put id_weight=0 in extra_settings to train without it)."),
                io.String.Input("extra_settings", default="", multiline=True, optional=True,
                                tooltip="More settings, one key=value per line (see training/config.py). The node "
                                        "loads data in its own process (num_workers=0); for a long run use the "
                                        "`python -m training train` command, whose loader uses worker processes."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing models/portraitbooth/<output_name>.safetensors. Off: "
                                         "an existing file stops the node before training."),
            ],
            outputs=[io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="weight_file")],
            is_output_node=True,
        )

    validate_inputs = classmethod(validate_widget_inputs)  # refuse bad values at queue time

    @classmethod
    @checked_inputs
    def execute(cls, ckpt_name, dataset, run_name, output_name, mode, steps, batch_size, grad_accum,
                learning_rate, lora_rank, save_every, seed, gradient_checkpointing, recognizer="",
                extra_settings="", overwrite=False) -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..training import api

        # Everything is checked before the models are unloaded and training starts.
        ckpt_name = checked_choice(ckpt_name, folder_paths.get_filename_list("checkpoints"), "ckpt_name")
        mode = checked_choice(mode, MODES, "mode")
        checked_text(run_name, "run_name")
        checked_text(recognizer or "", "recognizer")
        data = checked_path(dataset, "dataset")
        rec = str(checked_path(recognizer, "recognizer")) if recognizer.strip() else ""
        name = checked_name(output_name, "output_name")
        stem = name[: -len(".safetensors")] if name.endswith(".safetensors") else name
        checked_name(stem, "output_name")
        run = checked_name(run_name, "run_name") if run_name.strip() else stem
        run_dir = os.path.join(folder_paths.get_output_directory(), RUNS, run)
        target = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], stem + ".safetensors")
        settings = {
            "checkpoint": folder_paths.get_full_path_or_raise("checkpoints", ckpt_name), "dataset": str(data),
            "output": run_dir, "mode": mode, "steps": steps, "micro_batch": batch_size, "grad_accum": grad_accum,
            "lr": learning_rate, "lora_rank": lora_rank, "lora_alpha": float(lora_rank), "save_every": save_every,
            "seed": seed, "gradient_checkpointing": gradient_checkpointing, "recognizer": rec,
            # Loader worker processes would be forked from ComfyUI's threaded server, where a
            # lock held by another thread at fork time can hang the child: load in-process
            # unless extra_settings asks for workers.
            "num_workers": 0,
        } | _overrides(extra_settings)
        if os.path.lexists(target) and not overwrite:
            raise FileExistsError(
                f"output_name: models/{FOLDER}/{stem}.safetensors already exists. Choose another output_name, or "
                f"turn on overwrite to replace it.")
        try:
            api.check_dataset(data)
        except (OSError, ValueError) as exc:  # the dataset's own files name things they may not
            raise _named(exc, "dataset") from None
        try:
            api.check_resume(settings)
        except api.ResumeError as exc:
            raise api.ResumeError(f"run_name '{run}': {exc}") from None
        roots = [os.path.join(p, "models") for p in model_roots("insightface")]
        try:
            api.check_identity_loss(settings, roots, node=True)
        except api.IdentityLossError as exc:
            raise api.IdentityLossError(f"recognizer: {exc}") from None
        except (OSError, ValueError) as exc:  # the dataset's index names a recognizer it may not
            raise _named(exc, "dataset") from None
        mm.unload_all_models()  # training needs the whole device; ComfyUI reloads models later
        mm.soft_empty_cache()
        pbar = comfy.utils.ProgressBar(steps)
        try:
            result = api.run_training(settings, device=mm.get_torch_device(), export_to=target,
                                      on_step=lambda step, total, _values: pbar.update_absolute(step, total),
                                      recognizer_roots=roots, node_words=True)
        except api.IdentityLossError as exc:  # e.g. a given recognizer whose embeddings are not the dataset's
            raise api.IdentityLossError(f"recognizer: {exc}") from None
        finally:
            mm.soft_empty_cache()
        curve = torch.from_numpy(api.loss_curve(result)).float().div(255)[None]
        return io.NodeOutput(curve, os.path.basename(str(result.weights)))


def _named(exc: Exception, input_name: str) -> Exception:
    """The same kind of error, its message starting with the input it is about."""
    try:
        return type(exc)(f"{input_name}: {exc}")
    except TypeError:  # an exception type with other constructor arguments
        return ValueError(f"{input_name}: {exc}")


def _overrides(text: str) -> dict:
    from ..training.api import settings_from_text

    checked_text(text or "", "extra_settings")
    lines = [line.strip() for line in (text or "").splitlines() if "=" in line and not line.strip().startswith("#")]
    paths = sorted({line.split("=", 1)[0].strip() for line in lines} & PATH_SETTINGS)
    if paths:
        warm = " (init_unet and stage0_* warm-start settings: `python -m training train` only)" \
            if any(p in ("init_unet", "stage0_teacher", "stage0_clip_vision") for p in paths) else ""
        raise ValueError(f"extra_settings may not set {', '.join(paths)}: use the node's own inputs, whose "
                         f"paths are checked{warm}.")
    return settings_from_text(text or "", "extra_settings")


NODES = [DIPTrainer]
