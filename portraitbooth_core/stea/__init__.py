"""STEA, subject text-embedding augmentation (PortraitBooth §3.1).

  projector    `STEAProjector`, `ProjectorConfig`, `splice_identity`: the MLP that turns
               [class word's CLIP output || face embedding] into the token, and the splice
  class_words  `ClassWordMatcher`, `select_subjects`, `find_word_tokens`, `TokenizerWords`:
               where a word sits in a tokenized prompt (BPE ids, chunk aware)
The words themselves are in `portraitbooth_core.vocabulary`.
"""
