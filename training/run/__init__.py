"""One training run:

  data         deterministic sample order and draws, batches, the DataLoader path
  losses       noise loss and ECAC's localization loss on captured attention
  step         one forward pass of the objective (an nn.Module for DDP)
  trainer      the loop: resume, micro-batches, optimizer, logging, checkpoints, export
  checkpoint   saving, loading and pruning checkpoints of the run folder
  ownership    run.json: whose a run folder is and the settings it continues with
  lifecycle    one run per folder (run.lock), ranks that end with torchrun, stale temp files
  ema          exponential moving average of the trained weights
  distributed  torchrun ranks: process group, reductions
  metrics      metrics.jsonl, TensorBoard, the progress line
  health       the collapse alarm: a token's attention dead in the face, warned of or stopped at
  validate     fixed validation batches
  dip_check    the face recognizer DIP's identity loss needs, checked before training
  stage0       FastComposer warm start: the projector fitted to its fused tokens
  export       the PortraitBooth weight file the nodes load
  curve        the loss curve picture
"""
