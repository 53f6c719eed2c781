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
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..training.config import LIMITS, TrainConfig
from ..training.run.health import TrainingCollapsedError, alarm_lines, attention_line
from .base import CheckedNode
from .paths import checked_choice, checked_model_path, checked_name, checked_path, checked_text, model_roots
from .stea import FOLDER

CATEGORY = "PortraitBooth/training"
RUNS = "portraitbooth_runs"
PATH_SETTINGS = {"checkpoint", "dataset", "output", "recognizer", "export_name",
                 "init_unet", "stage0_teacher", "stage0_clip_vision"}  # warm start: the CLI's (no node input yet)
# The training default first: a combo's first entry is what a new node shows.
MODES = sorted(LIMITS["mode"].choices, key=lambda m: m != TrainConfig().mode)
# Number widget -> the training setting it sets. Its min, max and default are that
# setting's (training/config.py LIMITS, the one range every path checks), so the widget
# cannot offer a value the training refuses, nor refuse one it accepts.
WIDGET_SETTINGS = {"steps": "steps", "batch_size": "micro_batch", "grad_accum": "grad_accum",
                   "learning_rate": "lr", "lora_rank": "lora_rank", "save_every": "save_every", "seed": "seed"}
# A dataset's compact index (a derived cache, training/dataset/shard_index.py) is made here,
# in ComfyUI's temp folder, never beside the dataset: a dataset under input/ is someone's
# upload, and the trainer writes nothing into it.
INDEX_CACHE = ("portraitbooth", "dataset-index")


class DIPTrainer(CheckedNode):
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
                io.Combo.Input("mode", options=MODES, default=MODES[0],
                               tooltip="What trains beside the projector: LoRA adapters, the whole UNet, or nothing."),
                _number("steps"),
                _number("batch_size"),
                _number("grad_accum"),
                _number("learning_rate", step=1e-6,
                        tooltip="0: the mode's default (lora and frozen 1e-4, full 1e-5 as in the paper). "
                                "Any other value is used as given."),
                _number("lora_rank"),
                _number("save_every"),
                _number("seed"),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.String.Input("recognizer", default="", optional=True,
                                tooltip="ArcFace ONNX for the identity loss; empty: the dataset's recognizer, "
                                        "looked up in models/insightface/models/<pack>/. A dataset whose "
                                        "recognizer is neither found nor given stops the node before training "
                                        "(or put id_weight=0 in extra_settings to train without it)."),
                io.String.Input("extra_settings", default="", multiline=True, optional=True,
                                tooltip="More settings, one key=value per line (see training/config.py; each is "
                                        "checked against the same range as on the command line). The node "
                                        "loads data in its own process (num_workers=0); for a long run use the "
                                        "`python -m training train` command, whose loader uses worker processes."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Replace an existing models/portraitbooth/<output_name>.safetensors, and "
                                         "let this node change a run folder that is not simply its own run "
                                         "continued: start the run over when it was trained with other settings "
                                         "(deletes its checkpoints and logs), or take over a run another "
                                         "output_name made (keep_last then prunes its checkpoints); the report "
                                         "output says which. Off: each of these stops the node before training."),
            ],
            outputs=[io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="weight_file"),
                     io.String.Output(display_name="report", tooltip="The run's step, what overwrite did to its "
                                                                     "run folder, and any collapse alarm (a token's "
                                                                     "attention dead in the face); the node's text "
                                                                     "adds the identity and expression tokens' "
                                                                     "attention in the face at the last logged step.")],
            is_output_node=True,
        )

    @classmethod
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
        # Listed files and model folders may be links, but only into the allowed roots.
        checked_model_path(settings["checkpoint"], "ckpt_name", ckpt_name)
        checked_model_path(target, "output_name", f"{stem}.safetensors")
        # Before the weight file's check: a run that overwrite would start over or take over
        # is said first, so overwrite is not turned on for the file alone.
        try:
            start = api.check_resume(settings, owner=stem, overwrite=overwrite, node_words=True)
        except api.ResumeError as exc:
            raise api.ResumeError(f"run_name '{run}': {exc}") from None
        if os.path.lexists(target) and not overwrite:
            raise FileExistsError(
                f"output_name: models/{FOLDER}/{stem}.safetensors already exists. Choose another output_name, or "
                f"turn on overwrite to replace it.")
        index_cache = os.path.join(folder_paths.get_temp_directory(), *INDEX_CACHE)
        try:
            api.check_dataset(data, index_cache=index_cache, precomputed=settings.get("precomputed") != "off")
        except (OSError, ValueError) as exc:  # the dataset's own files name things they may not
            raise _named(exc, "dataset") from None
        roots = [os.path.join(p, "models") for p in model_roots("insightface")]
        try:
            found = api.check_identity_loss(settings, roots, node=True, index_cache=index_cache)
        except api.IdentityLossError as exc:
            raise api.IdentityLossError(f"recognizer: {exc}") from None
        except (OSError, ValueError) as exc:  # the dataset's index names a recognizer it may not
            raise _named(exc, "dataset") from None
        if found is not None and not rec:  # the dataset's recognizer, found in a pack folder
            checked_model_path(found, "recognizer", Path(found).name)
        mm.unload_all_models()  # training needs the whole device; ComfyUI reloads models later
        mm.soft_empty_cache()
        pbar = comfy.utils.ProgressBar(steps)

        def on_step(step: int, total: int, _values: dict) -> None:
            # ComfyUI's /interrupt stops the run here, within one step of being asked (the
            # progress hook checks it too, but only where a server installed one).
            mm.throw_exception_if_processing_interrupted()
            pbar.update_absolute(step, total)

        try:
            result = api.run_training(settings, device=mm.get_torch_device(), export_to=target,
                                      on_step=on_step,
                                      recognizer_roots=roots, node_words=True, owner=stem, overwrite=overwrite,
                                      index_cache=index_cache)
        except api.IdentityLossError as exc:  # e.g. a given recognizer whose embeddings are not the dataset's
            raise api.IdentityLossError(f"recognizer: {exc}") from None
        except api.ResumeError as exc:  # the run folder changed since check_resume
            raise api.ResumeError(f"run_name '{run}': {exc}") from None
        except TrainingCollapsedError as exc:  # on_collapse=stop: the checkpoint is saved, the message says what to do
            raise TrainingCollapsedError(f"run_name '{run}': {exc}") from None
        finally:
            mm.soft_empty_cache()
        curve = torch.from_numpy(api.loss_curve(result)).float().div(255)[None]
        weights = os.path.basename(str(result.weights))
        report = "\n".join([*result.notes, f"run_name '{run}': step {result.step} "
                            f"({f'continued from step {start}' if start else 'new run'}); weight file {weights}",
                             *alarm_lines(result.metrics)])
        # The node's text also shows the tokens' attention in the face (the report output stays the run's story).
        attention = attention_line(result.metrics)
        shown = f"{report}\n{attention}" if attention else report
        return io.NodeOutput(curve, weights, report, ui={"text": [shown]})


def _number(widget: str, **kwargs) -> io.Int.Input | io.Float.Input:
    """The number widget of WIDGET_SETTINGS[widget]: min, max and default from that setting."""
    setting = WIDGET_SETTINGS[widget]
    limit, default = LIMITS[setting], getattr(TrainConfig(), setting)
    kind = io.Float.Input if isinstance(default, float) else io.Int.Input
    return kind(widget, default=default, min=limit.low, max=limit.high, **kwargs)


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
