"""One sample's members in a shard: written by the builder (encode_image, npy) and read by
training (decode). jpg: the target image; mask.png: the face mask; ref.png: the aligned
reference face; emb.npy: its face embedding; json: landmarks, caption and token positions."""
from __future__ import annotations

import io

import numpy as np
import torch


def encode_image(array: np.ndarray, fmt: str = "PNG", **options) -> bytes:
    """An image file's bytes for a shard member (PNG for masks and faces, JPEG for targets)."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **options)
    return buf.getvalue()


def npy_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array, np.float32), allow_pickle=False)
    return buf.getvalue()


def _image(data: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB") if im.mode not in ("L",) else im)


MAX_SAMPLE_JSON_BYTES = 1 << 20  # landmarks, a caption and token positions: a few hundred bytes


def sample_meta(raw: dict[str, bytes]) -> dict:
    """A sample's json member, bounded in size and depth (a dataset may be anyone's upload)."""
    from portraitbooth_core.bounded_json import load_json_bytes

    key = raw.get("__key__", b"?").decode("utf-8", "replace")[:40]
    meta = load_json_bytes(raw["json"], f"sample {key!r} member 'json'", MAX_SAMPLE_JSON_BYTES)
    if not isinstance(meta, dict):
        from portraitbooth_core.paths import BadInputError

        raise BadInputError(f"sample {key!r} member 'json': not a JSON object; rebuild the dataset.")
    return meta


def decode(raw: dict[str, bytes]) -> dict:
    meta = sample_meta(raw)
    img = torch.from_numpy(_image(raw["jpg"]).copy()).permute(2, 0, 1).float() / 255
    mask = torch.from_numpy(_image(raw["mask.png"]).copy()).float() / 255
    ref = torch.from_numpy(_image(raw["ref.png"]).copy()).permute(2, 0, 1).float() / 255
    emb = torch.from_numpy(np.load(io.BytesIO(raw["emb.npy"]), allow_pickle=False).astype(np.float32))
    return {"image": img, "mask": mask if mask.ndim == 2 else mask[..., 0], "ref": ref, "embedding": emb,
            "landmarks": torch.tensor(meta["landmarks"], dtype=torch.float32), "meta": meta}
