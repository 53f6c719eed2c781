"""The dataset on disk, as training reads it and the builder writes it:

  storage        where a dataset lives (a folder or an fsspec URL), range reads, atomic writes
  index_file     index.json: its format, bounds, name fields and the check every reader runs
  shards         ShardWriter / ShardReader, the recorded face recognizer
  shard_index    the compact index (index.compact.*) that opens large datasets fast
  names          the name fields of every dataset file, declared per format and checked from that
  samples        one sample's members (jpg, mask.png, ref.png, emb.npy, json): encode and decode
  precomputed    precomputed/ side files (latents, text encodings): format and reader
"""
