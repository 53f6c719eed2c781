"""DIP Trainer inside a real ComfyUI: a graph submitted over HTTP trains and saves a model."""
from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import MODELS_DIR, TEST_CHECKPOINT
from training_fixtures import *  # noqa: F401,F403
from training_fixtures import steps_with_identity_loss


@pytest.mark.slow  # own server and a training run: ~10 s
def test_dip_trainer_graph_trains_and_writes_a_loadable_model(start_server, dataset_dir, sd15_checkpoint,
                                                              recognizer_pack):
    from portraitbooth_core.weights.file import load_portraitbooth

    server = start_server()
    shutil.copytree(dataset_dir, server.input_dir / "faces")  # datasets must sit under ComfyUI's folders
    # the dataset's stand-in recognizer, given as the node input (the node refuses to train
    # without the identity loss's recognizer unless id_weight=0 is set)
    shutil.copytree(recognizer_pack, server.input_dir / "packs" / recognizer_pack.name, dirs_exist_ok=True)
    name = f"server_test_{os.getpid()}"
    target = MODELS_DIR / "portraitbooth" / f"{name}.safetensors"
    graph = {
        "1": {"class_type": "PortraitBoothDIPTrainer", "inputs": {
            "ckpt_name": TEST_CHECKPOINT, "dataset": "faces", "run_name": name, "output_name": name,
            "mode": "lora", "steps": 2, "batch_size": 2, "grad_accum": 1, "learning_rate": 1e-3,
            "lora_rank": 4, "save_every": 1, "seed": 0, "gradient_checkpointing": True,
            "extra_settings": "", "recognizer": f"packs/{recognizer_pack.name}/w600k_r50.onnx"}},
        "2": {"class_type": "PreviewImage", "inputs": {"images": ["1", 0]}},
    }
    try:
        result = server.client.run(graph, timeout=600)
        assert len(result.images("2")) == 1  # the loss curve
        model = load_portraitbooth(target)
        assert model.info.training["steps"] == 2
        # The recipe's R_t = 250 (seed 0, batch 2): step 1 drew an identity sample at t = 65.
        from training.config import TrainConfig

        metrics = server.output_dir / "portraitbooth_runs" / name / "metrics.jsonl"
        logged = [json.loads(line) for line in metrics.read_text().splitlines()]
        expected = steps_with_identity_loss(TrainConfig(seed=0, micro_batch=2), 2)
        assert ["id" in r for r in logged] == expected and expected[0]
    finally:
        target.unlink(missing_ok=True)
