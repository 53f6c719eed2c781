"""Training package: datasets, the PortraitBooth training loop (noise, localization and
identity losses), distributed launch and export to the weight file the nodes load.

    python -m training build <people folders> <dataset>     sources, face_crops, captions, build, shards,
    python -m training merge <dataset> <part>...             build_pool (--workers), merge (--part i/N)
    python -m training train --config run.toml [--set k=v]  config, dip_check, models, lora, data, losses,
    torchrun --nproc_per_node N -m training train ...       step, precision, trainer, checkpoint,
    python -m training export --output <run folder>         distributed, ema, metrics, validate, export
    python -m training.evidence                              evidence/: the small-scale ablation run

In-process callers (the DIP Trainer node) use `training.api` only: `run_training`,
`changed_settings`, `check_dataset`, `check_identity_loss`, `check_resume`, `loss_curve`. The losses themselves live in the core, by feature:
ECAC's in `portraitbooth_core.ecac.loss`, DIP's in `portraitbooth_core.dip`.

Internal imports are relative, so that inside ComfyUI this package is `<pack>.training`
and never a global `training` module; the core is imported as `portraitbooth_core`.
"""
