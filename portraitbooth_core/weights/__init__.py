"""The PortraitBooth weight file and which model family a file belongs to.

  file    `save_portraitbooth`, `load_portraitbooth`, `read_info`, `PortraitBoothModel`
  meta    `PortraitBoothInfo`, `FaceEncoderSpec`, `check_embedding`, the typed load errors
  family  `family_from_shapes`, `checkpoint_family`, `context_family`, `require_sd15`:
          the one owner of "is this SD1.5?"; `read_safetensors_header`
  safetensors_header  `read_header`: the one reader of .safetensors headers (identity
          files, weight files, checkpoints), with its typed errors
"""
