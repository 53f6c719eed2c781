"""Stand-in models: random weights in the real file formats, built in seconds.

No SD1.5, CLIP or ArcFace weights can be downloaded here, so the smoke run of
`headless.generate`, the tests, the benchmarks and the training evidence build these:
  sd15  SD1.5 checkpoints (full-size or a one-level 320-channel UNet, CLIP-L, TAESD),
        PortraitBooth weight files, a small in-process ModelPatcher
  templates  the stand-in files, photos and sizes that every shipped template runs with
  photomaker  PhotoMaker v1/v2 releases (.bin / .safetensors) and their full-size key listing
"""
