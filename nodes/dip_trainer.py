"""DIP Trainer: run (or continue) PortraitBooth training from inside ComfyUI.

Thin: the training package does the work; this node checks paths, builds the config,
drives ComfyUI's progress bar and returns a loss-curve picture. Runs live in
output/portraitbooth_runs/<run_name>/ (checkpoints, metrics, validation images); the
weight file goes to models/portraitbooth/<output_name>.safetensors, where Load
PortraitBooth Model lists it.
"""
from __future__ import annotations

import os

import folder_paths
import torch
from comfy_api.latest import io

from .stea import FOLDER
from .paths import checked_path

CATEGORY = "PortraitBooth/training"
RUNS = "portraitbooth_runs"
PATH_SETTINGS = {"checkpoint", "dataset", "output", "recognizer", "export_name"}


def _extra(text: str) -> list[str]:
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


class DIPTrainer(io.ComfyNode):
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
                io.String.Input("run_name", default="portraitbooth",
                                tooltip=f"Run folder under output/{RUNS}/; an existing run is continued."),
                io.String.Input("output_name", default="portraitbooth_trained",
                                tooltip="Weight file name written to models/portraitbooth/ (.safetensors)."),
                io.Combo.Input("mode", options=["lora", "full", "frozen"], default="lora",
                               tooltip="What trains beside the projector: LoRA adapters, the whole UNet, or nothing."),
                io.Int.Input("steps", default=1000, min=1, max=1_000_000),
                io.Int.Input("batch_size", default=1, min=1, max=64),
                io.Int.Input("grad_accum", default=1, min=1, max=256),
                io.Float.Input("learning_rate", default=1e-5, min=1e-8, max=1e-2, step=1e-6),
                io.Int.Input("lora_rank", default=16, min=1, max=256),
                io.Int.Input("save_every", default=100, min=1, max=100_000),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1),
                io.Boolean.Input("gradient_checkpointing", default=True),
                io.String.Input("recognizer", default="", optional=True,
                                tooltip="ArcFace ONNX for the identity loss; empty: the dataset's recognizer."),
                io.String.Input("extra_settings", default="", multiline=True, optional=True,
                                tooltip="More settings, one key=value per line (see training/config.py)."),
            ],
            outputs=[io.Image.Output(display_name="loss_curve"), io.String.Output(display_name="weight_file")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, ckpt_name, dataset, run_name, output_name, mode, steps, batch_size, grad_accum,
                learning_rate, lora_rank, save_every, seed, gradient_checkpointing, recognizer="",
                extra_settings="") -> io.NodeOutput:
        import comfy.model_management as mm
        import comfy.utils

        from ..training.config import load_config
        from ..training.curve import loss_curve
        from ..training.distributed import Dist
        from ..training.metrics import read_metrics
        from ..training.trainer import Trainer

        data = checked_path(dataset, "dataset")
        rec = str(checked_path(recognizer, "recognizer")) if recognizer.strip() else ""
        safe_run = os.path.basename(run_name.strip()) or "portraitbooth"
        run_dir = os.path.join(folder_paths.get_output_directory(), RUNS, safe_run)
        name = os.path.basename(output_name.strip()) or "portraitbooth_trained"
        name = name if name.endswith(".safetensors") else name + ".safetensors"
        target = os.path.join(folder_paths.get_folder_paths(FOLDER)[0], name)
        config = load_config(None, {
            "checkpoint": folder_paths.get_full_path_or_raise("checkpoints", ckpt_name), "dataset": str(data),
            "output": run_dir, "mode": mode, "steps": steps, "micro_batch": batch_size, "grad_accum": grad_accum,
            "lr": learning_rate, "lora_rank": lora_rank, "lora_alpha": float(lora_rank), "save_every": save_every,
            "seed": seed, "gradient_checkpointing": gradient_checkpointing, "recognizer": rec,
        } | _overrides(extra_settings))
        mm.unload_all_models()  # training needs the whole device; ComfyUI reloads models later
        mm.soft_empty_cache()
        device = mm.get_torch_device()
        pbar = comfy.utils.ProgressBar(steps)
        with torch.inference_mode(False), torch.enable_grad(), torch.random.fork_rng(devices=[]):
            trainer = Trainer(config, Dist(device=device))
            try:
                pbar.update_absolute(trainer.step, steps)
                path = trainer.run(lambda step, total, _values: pbar.update_absolute(step, total), target)
            finally:
                trainer.close()
                del trainer
                mm.soft_empty_cache()
        curve = torch.from_numpy(loss_curve(read_metrics(run_dir))).float().div(255)[None]
        return io.NodeOutput(curve, os.path.basename(str(path)))


def _overrides(text: str) -> dict:
    from ..training.config import apply_overrides, TrainConfig

    lines = _extra(text or "")
    if not lines:
        return {}
    paths = sorted({line.split("=", 1)[0].strip() for line in lines} & PATH_SETTINGS)
    if paths:
        raise ValueError(f"extra_settings may not set {', '.join(paths)}: use the node's own inputs, whose "
                         f"paths are checked.")
    base = TrainConfig()
    changed = apply_overrides(base, lines)
    return {k: v for k, v in changed.to_dict().items() if v != getattr(base, k)}


NODES = [DIPTrainer]
