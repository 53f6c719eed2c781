"""STEA, subject text-embedding augmentation (PortraitBooth §3.1).

  projector    `STEAProjector`, `ProjectorConfig`, `splice_identity`: the MLP that turns
               [class word's CLIP output || face embedding] into the token, and the splice;
               `build_projector` makes the network a weight file's projector kind names
  postfuse     `FastComposerPostfuse`: FastComposer's projector (CLIP image embedding)
  photomaker   PhotoMaker v1/v2 ID heads (SDXL) and `fuse_class_tokens`/`splice_photomaker`
  class_words  `ClassWordMatcher`, `select_subjects`, `TokenizerWords`: where a class
               word sits in a tokenized prompt (BPE ids, chunk aware)
The words themselves are in `portraitbooth_core.vocabulary`.
"""
