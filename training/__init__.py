"""Training package: build a dataset, train PortraitBooth on it (noise, localization and
identity losses), export the weight file the nodes load. One folder per stage; each uses
only the folders above it in this list, never one below:

  config.py    TrainConfig: every setting of a run, its range, TOML/--set/extra_settings
  dataset/     the dataset on disk: where it lives (storage), shards and index.json,
               the compact index, one sample's members, precomputed side files
  models/      what a run loads: the SD1.5 models (load), LoRA, precision, the text
               cache, warm-start files (FastComposer's UNet, projector, CLIP vision)
  build/       making a dataset: people folders and CelebV-Text clips (sources, person,
               celebv_text), captions and the captioner, face crops, one person's
               samples (analyze), settings and state, the journal, the builder, worker
               pool, merging parts, precomputing latents and text encodings
  run/         one run: data order and batches, losses, the step, the trainer,
               checkpoints, EMA, distributed, metrics, validation, stage 0, the
               identity-loss check, export, the loss curve
  api.py       what the DIP Trainer node calls: run_training, changed_settings,
               check_dataset, check_identity_loss, check_resume, loss_curve
  __main__.py  the command line:

    python -m training build <people folders> <dataset> [--workers N] [--part i/N]
    python -m training merge <dataset> <part>...
    python -m training precompute <dataset> --model <SD1.5 checkpoint>
    python -m training train --config run.toml [--set k=v]   (torchrun for several ranks)
    python -m training export --output <run folder>
    python -m training import-fastcomposer pytorch_model.bin --models <ComfyUI>/models
    python -m training import-photomaker photomaker-v2.bin --models <ComfyUI>/models

Imported weight formats (FastComposer's and PhotoMaker's releases) live beside the weight file the nodes
load: portraitbooth_core.weights.formats. The losses live in the core, by feature:
ECAC's in portraitbooth_core.ecac.loss, DIP's in portraitbooth_core.dip. The small-scale
evidence run is a client of this package: `python -m evidence` (evidence/ at the top).

Internal imports are relative, so that inside ComfyUI this package is `<pack>.training`
and never a global `training` module; the core is imported as `portraitbooth_core`.
"""
