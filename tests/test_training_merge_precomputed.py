"""Merging the parts of a split build carries the parts' precomputed inputs (VAE latents and
CLIP text encodings) into the merged dataset: one precompute per part machine, none after
the merge. The parts are built with the scale tests' stand-in face encoder (tests/build_standins.py)
and precomputed with the stand-in SD1.5 checkpoint; a one-process build, precomputed after,
is what the merged dataset and its precomputed inputs must equal.
"""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch

from build_standins import make_encoder, make_people, scale_settings
from conftest import MODELS_DIR
from training_fixtures import edit_json, flip_image_byte

PEOPLE = 30
SHARD_SIZE = 4  # several shards per part, and merged shards that take samples of both parts


@pytest.fixture(scope="module")
def checkpoint(sd15_checkpoint) -> str:
    return str(MODELS_DIR / "checkpoints" / sd15_checkpoint)


@pytest.fixture(scope="module")
def encode_once():
    """The module's precompute runs load the checkpoint once and encode each caption once
    (loading and CLIP on the CPU are most of a run's time; both are deterministic)."""
    import training.models.load as models
    import training.models.text_cache as step

    real, loaded, texts = models.load_models, {}, {}

    def cached(config, device):
        key = (config.checkpoint, str(device), config.mode)
        if key not in loaded:
            loaded[key] = real(config, device)
        return loaded[key]

    class SharedTextCache(step.TextCache):
        def __init__(self, clip, limit: int = 2048):
            super().__init__(clip, limit)
            self.cache = texts.setdefault(id(clip), {})

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models, "load_models", cached)
        patch.setattr(step, "TextCache", SharedTextCache)
        yield


@pytest.fixture(scope="module")
def built(tmp_path_factory, checkpoint, encode_once) -> dict:
    """Parts 0/2 and 1/2, each precomputed on its own (as on two machines), and the
    one-process build of the same people precomputed after: the reference."""
    from training.build.builder import DatasetBuilder
    from training.build.precompute import precompute

    root = tmp_path_factory.mktemp("merge-precomputed")
    people = make_people(root / "people", PEOPLE)
    settings = scale_settings(shard_size=SHARD_SIZE)
    parts = [root / "part0", root / "part1"]
    for i, part in enumerate(parts):
        DatasetBuilder(people, part, make_encoder(), settings, progress=False, part=f"{i}/2").build()
        # batch size 1: each latent is encoded alone, so it is bitwise the same whatever shard it lands in
        precompute(str(part), checkpoint, batch_size=1, progress=False)
    reference = root / "one-process"
    DatasetBuilder(people, reference, make_encoder(), settings, progress=False).build()
    precompute(str(reference), checkpoint, batch_size=1, progress=False)
    return {"parts": parts, "reference": reference}


def file_content(path: Path):
    """A file's bytes; for a safetensors file its parsed header and its data bytes."""
    data = path.read_bytes()
    if path.suffix != ".safetensors":
        return data
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + size]), data[8 + size:]


def stored_inputs(dataset: Path, checkpoint: str) -> dict[str, tuple]:
    """Per sample key: (sample digest, latent, text encoding, empty-caption encoding), read with
    the trainer's own lookup (Precomputed.open runs every staleness check first)."""
    from training.dataset.precomputed import Precomputed, sample_digest
    from training.dataset.shards import ShardReader

    reader = ShardReader(dataset)
    try:
        pre = Precomputed.open(reader, checkpoint)
        assert pre is not None, f"{dataset} has no precomputed inputs"
        out = {}
        for i in range(len(reader)):
            raw = reader.read(i)
            latent, text = pre.lookup(i, raw, uncond=False)
            _, empty = pre.lookup(i, raw, uncond=True)
            out[raw["__key__"].decode()] = (sample_digest(raw), latent, text, empty)
        return out
    finally:
        reader.close()


def test_parts_precomputed_then_merged_equal_merged_then_precomputed(built, checkpoint, tmp_path):
    from test_training_build_scale import assert_same_dataset
    from training.build.merge import merge_parts
    from training.dataset.precomputed import FOLDER, MANIFEST

    parts, reference = built["parts"], built["reference"]
    out = tmp_path / "merged"
    report = merge_parts(out, [parts[1], parts[0]])
    carried = report.pop("precomputed", None)
    assert (out / MANIFEST).is_file(), carried
    assert report == json.loads((reference / "report.json").read_text())
    assert_same_dataset(out, reference)  # the dataset files are untouched by carrying the inputs
    assert carried["carried"] is True and carried["shards"] == report["shards"] and \
        carried["samples"] == report["samples"], carried
    assert "carried" in carried["message"]

    # The merged shards are cut elsewhere than the parts' (a shard takes the end of part 0 and
    # the start of part 1): side files are re-packed, not copied.
    def counts(folder: Path) -> list[int]:
        return [s["count"] for s in json.loads((folder / "index.json").read_text())["shards"]]

    assert counts(out) != counts(parts[0]) + counts(parts[1]), counts(out)

    # What `precompute` writes for the merged dataset: the same manifest and side files
    # (header and tensor bytes; safetensors orders the metadata keys differently in every process).
    want = sorted(p.name for p in (reference / FOLDER).iterdir())
    assert sorted(p.name for p in (out / FOLDER).iterdir()) == want
    for name in want:
        assert file_content(out / FOLDER / name) == file_content(reference / FOLDER / name), name

    # Per sample key: the trainer's lookup gives the same tensors on both, and they are the
    # parts' stored rows bitwise.
    merged, fresh = stored_inputs(out, checkpoint), stored_inputs(reference, checkpoint)
    assert sorted(merged) == sorted(fresh) and len(merged) == report["samples"]
    by_digest = {}
    for part in parts:
        by_digest.update({v[0]: v for v in stored_inputs(part, checkpoint).values()})
    for key, (digest, latent, text, empty) in merged.items():
        assert fresh[key][0] == digest
        for got, ref, stored in zip((latent, text, empty), fresh[key][1:], by_digest[digest][1:]):
            assert torch.equal(got, ref) and torch.equal(got, stored), key


def test_a_part_without_precomputed_inputs_merges_without_them_and_says_what_to_run(built, checkpoint, tmp_path,
                                                                                      capsys):
    from training.__main__ import main
    from training.build.merge import merge_parts
    from training.dataset.precomputed import FOLDER, MANIFEST

    part0, part1 = built["parts"]
    bare = tmp_path / "part1-bare"
    shutil.copytree(part1, bare)
    shutil.rmtree(bare / FOLDER)
    out = tmp_path / "merged"
    assert merge_parts(out, [part0, part1])["precomputed"]["carried"]
    # ... then replaced by a merge whose part 1 has none: the old inputs go too.
    report = merge_parts(out, [part0, bare], overwrite=True)["precomputed"]
    assert not (out / FOLDER).exists()
    assert report["carried"] is False and report["parts"] == [str(bare)], report
    assert "part 1/2" in report["message"] and str(bare) in report["message"]
    assert report["command"] == f"python -m training precompute {out} --model {Path(checkpoint).name}"
    assert report["command"] in report["message"]

    # The command line prints it.
    cli = tmp_path / "cli"
    assert main(["merge", str(cli), str(part0), str(bare)]) == 0
    printed = capsys.readouterr().out
    assert f"python -m training precompute {cli} --model " in printed and "part 1/2" in printed
    assert not (cli / FOLDER).exists()

    # Parts precomputed with another dtype (or another VAE/text encoder) are not mixed.
    other = tmp_path / "part1-fp16"
    shutil.copytree(part1, other)
    edit_json(other / MANIFEST, lambda m: m.update(dtype="fp16"))
    report = merge_parts(tmp_path / "m2", [part0, other])["precomputed"]
    assert report["carried"] is False and not (tmp_path / "m2" / FOLDER).exists()
    assert "dtype" in report["message"] and "fp16" in report["message"] and str(other) in report["message"]
    edit_json(other / MANIFEST, lambda m: m.update(dtype="fp32", encoders="0" * 32))
    report = merge_parts(tmp_path / "m3", [part0, other])["precomputed"]
    assert report["carried"] is False and "0" * 32 in report["message"] and str(other) in report["message"]

    # A part whose sample changed in place after its precompute: its rows are stale, none carried.
    changed = tmp_path / "part1-changed"
    shutil.copytree(part1, changed)
    flip_image_byte(changed)
    report = merge_parts(tmp_path / "m4", [part0, changed])["precomputed"]
    assert report["carried"] is False and not (tmp_path / "m4" / FOLDER).exists()
    assert "another version of sample" in report["message"] and str(changed) in report["message"]
