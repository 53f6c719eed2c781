"""Small-scale evidence: does each PortraitBooth mechanism do its job on our real
training code? A synthetic identity task (world.py, dataset.py); per seed one
pretrained text-to-image base and four fine-tunings of it with the real Trainer
(runs.py: full / w/o STEA / w/o DIP / w/o ECAC); three measurements on held-out
renderings (measure.py) and a Table-6-style report with stated margins (report.py).

    python -m evidence [--quick] [--seeds 0,1,2] [--jobs 2] [--out DIR]
    python -m evidence --warm-start [--seeds 0] [--warm-steps 300]   # warm.py: FastComposer warm start

Not the paper's figures: random-weight text encoder, a 64-channel UNet trained for
minutes, a hand-set VAE and a stand-in recognizer.
"""
