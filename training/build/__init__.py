"""Making a dataset (`python -m training build|merge|precompute`):

  person, sources   a person folder of photos and videos; the folders of a source
  celebv_text       CelebV-Text's layout, descriptions and emotion labels
  captions          caption files, class words and their synonyms, token positions
  captioner         captions for images that have none (BLIP, local files only)
  face_crops        one photo -> face crop, mask, landmarks, embedding
  analyze           one person -> samples, each target with a reference face
  settings          build settings, the face encoder record, parts, state differences
  journal           committed shards (resume), the shard writer, index.json/report.json
  builder           DatasetBuilder: the whole build, in order, with workers or parts
  pool              the worker processes (`--workers`), preloaded by _preload
  merge             parts built on several machines -> the dataset one process builds
  precompute        VAE latents and text encodings written beside the shards
"""
