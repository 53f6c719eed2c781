"""Small-scale evidence: does each PortraitBooth mechanism do its job on our real
training code? A synthetic identity task (world.py, dataset.py), four trainings of a
small ComfyUI UNet with the real Trainer (runs.py: full / w/o STEA / w/o DIP /
w/o ECAC), three measurements on held-out renderings (measure.py) and a Table-6-style
report with stated margins (report.py).

    python -m evaluation.evidence [--quick] [--steps N] [--out DIR]

Not the paper's figures: random-weight text encoder, a 64-channel UNet trained from
scratch for minutes, a hand-set VAE and a stand-in recognizer.
"""
