"""Stand-in inputs of the training benchmark, built once into the host cache: a random
SD1.5 checkpoint in ComfyUI's format with the full KL VAE (the VAE DIP decodes through),
and a synthetic face dataset in the training shard format (no face detection needed)."""
from __future__ import annotations

import json
import os
from pathlib import Path

if not __package__:  # run as `python benchmarks/<name>.py`: only benchmarks/ is on sys.path
    import harness
    harness.use_repo()

KL_DDCONFIG = {"double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
               "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}


def cache_dir() -> Path:
    from headless.comfyui import host_dir

    path = host_dir() / "cache" / "bench_train"
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_checkpoint(full: bool) -> Path:
    from safetensors.torch import save_file

    from benchmarks.ecac_cost import SD15_FULL
    from standins.sd15 import randomize, clip_l_state_dict, tiny_unet_state_dict

    path = cache_dir() / f"sd15_{'full' if full else 'tiny'}_klvae.safetensors"
    if path.is_file():
        return path
    import comfy.ldm.models.autoencoder as ae

    vae = ae.AutoencoderKL(ddconfig=dict(KL_DDCONFIG), embed_dim=4)
    randomize(vae, 3)
    sd = {}
    for prefix, part in (("model.diffusion_model.", tiny_unet_state_dict(0, **(SD15_FULL if full else {}))),
                         ("cond_stage_model.", clip_l_state_dict(1)), ("first_stage_model.", vae.state_dict())):
        sd.update({prefix + k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in part.items()})
    save_file(sd, str(path.with_suffix(".part")))
    os.replace(path.with_suffix(".part"), path)
    return path


def build_dataset(resolution: int, full: bool, count: int = 8) -> Path:
    """Synthetic samples (no face detection needed): a face-sized ellipse mask around
    ArcFace-template landmarks in the image centre, random reference embeddings."""
    import io

    import numpy as np

    from portraitbooth_core.face.align import ARCFACE_TEMPLATE
    from standins_face import build_arcface_onnx
    from training.build.captions import TokenFinder
    from training.dataset.shards import FORMAT, INDEX, ShardWriter, write_json_atomic

    out = cache_dir() / (f"data_{resolution}" if count == 8 else f"data_{resolution}_{count}")
    recognizer = cache_dir() / ("r100_standin.onnx" if full else "small_standin.onnx")
    if not recognizer.is_file():
        kwargs = {"widths": (64, 128, 256, 512), "blocks": (3, 13, 30, 3)} if full else {}
        build_arcface_onnx(recognizer, **kwargs)
    if (out / INDEX).is_file():
        return out
    rng = np.random.default_rng(0)
    caption = "a photo of a smiling man"
    ident, _, expr = TokenFinder().positions(caption, "man")
    scale = resolution / 2 / 112
    lm = ARCFACE_TEMPLATE * scale + resolution / 4
    yy, xx = np.mgrid[:resolution, :resolution]
    mask = ((((xx - resolution / 2) / (resolution / 4)) ** 2 + ((yy - resolution / 2) / (resolution / 3)) ** 2) <= 1)
    from PIL import Image

    def enc(array, fmt):
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format=fmt)
        return buf.getvalue()

    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "shard-00000")
    for i in range(count):
        emb = rng.normal(size=512).astype(np.float32)
        buf = io.BytesIO()
        np.save(buf, emb / np.linalg.norm(emb), allow_pickle=False)
        meta = {"caption": caption, "identity_positions": ident, "expression_positions": expr,
                "expression_words": ["smiling"], "landmarks": lm.tolist(), "box": [0, 0, 1, 1], "source": str(i)}
        writer.add(f"{i:08d}", {"jpg": enc(rng.integers(0, 255, (resolution, resolution, 3), dtype=np.uint8), "JPEG"),
                                "mask.png": enc((mask * 255).astype(np.uint8), "PNG"),
                                "ref.png": enc(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8), "PNG"),
                                "emb.npy": buf.getvalue(), "json": json.dumps(meta).encode()})
    shard = writer.close()
    write_json_atomic(out / INDEX, {"format": FORMAT, "resolution": resolution, "samples": count, "shards": [shard],
                                    "face_encoder": {"kind": "arcface:standin", "dim": 512, "feature": "final",
                                                     "recognizer_path": str(recognizer)},
                                    "identity_words": ["man", "woman"]})
    return out
