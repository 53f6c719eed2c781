"""The training data path: a DataLoader keyed by global sample position (workers give what
today's synchronous reader gives, for a seed and after a resume), bounded open shard
files, the memory-mapped compact index, datasets behind an fsspec URL, and precomputed
VAE latents / text encodings (same loss, refused when stale)."""
from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import tarfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from training_fixtures import *  # noqa: F401,F403
from training_fixtures import edit_json, flip_image_byte, train_config

LATENT_HW = (8, 8)


@pytest.fixture(autouse=True)
def index_cache(tmp_path, monkeypatch):
    """Indexes of datasets that are not written beside them go to this test's folder."""
    monkeypatch.setenv("PORTRAITBOOTH_INDEX_CACHE", str(tmp_path / "index-cache"))
    return tmp_path / "index-cache"


# -- "today's reader": the synchronous path as it was, from the tars themselves --------------
def reference_batch(dataset: Path, config, positions: list[int]) -> dict:
    """What the pre-DataLoader reader gave for these positions: shards in index order, keys
    sorted, epoch e = torch.randperm(N, generator(seed, 7, e)), members read by name with
    tarfile, decode + draw per position, stacked."""
    from training.run.data import UNCOND, draw, generator
    from training.dataset.samples import decode

    index = json.loads((dataset / "index.json").read_text())
    samples = []
    for shard in index["shards"]:
        with tarfile.open(dataset / shard["tar"]) as tar:
            groups: dict[str, dict] = {}
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                groups.setdefault(key, {})[ext] = tar.extractfile(m).read()
        samples += [{"__key__": k.encode(), **groups[k]} for k in sorted(groups)]
    n = len(samples)
    out = {k: [] for k in ("images", "masks", "landmarks", "embeddings", "references", "captions", "modes",
                           "timesteps", "noise", "masked_noise")}
    for p in positions:
        perm = torch.randperm(n, generator=generator(config.seed, 7, p // n))
        s = decode(samples[int(perm[p % n])])
        d = draw(p, config, LATENT_HW)
        for k, v in (("images", s["image"]), ("masks", s["mask"]), ("landmarks", s["landmarks"]),
                     ("embeddings", s["embedding"]), ("references", s["ref"]), ("modes", d["mode"]),
                     ("timesteps", d["t"]), ("noise", d["noise"]), ("masked_noise", d["masked"]),
                     ("captions", "" if d["mode"] == UNCOND else s["meta"]["caption"])):
            out[k].append(v)
    return {k: (torch.stack(v) if isinstance(v[0], torch.Tensor) else
                v if k == "captions" else torch.tensor(v)) for k, v in out.items()}


def assert_same(batch, expected: dict) -> None:
    for name, value in expected.items():
        got = getattr(batch, name)
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and torch.equal(got, value), name  # bit for bit
        else:
            assert got == value, name


def stream(dataset: Path, config, rank: int = 0, world: int = 1, end_step: int | None = None):
    from training.run.data import BatchLoader, MicroBatchStream
    from training.dataset.shards import ShardReader

    reader = ShardReader(dataset)
    loader = BatchLoader(reader, config)
    return MicroBatchStream(loader.dataset(LATENT_HW), config, rank, world, torch.device("cpu"), end_step), loader


def test_loader_with_workers_gives_todays_sequence_and_the_same_after_a_resume(dataset_dir):
    from training.config import TrainConfig
    from training.run.data import micro_positions

    # 5 samples, 2 x 2 per step: epochs end mid-micro-batch, so resumes land mid-epoch.
    config = TrainConfig(dataset=str(dataset_dir), seed=3, micro_batch=2, grad_accum=2, num_workers=2)
    steps = 4
    for world in (1, 2):
        for rank in range(world):
            s, loader = stream(dataset_dir, config, rank, world, end_step=steps)
            try:
                for step in range(steps):
                    for micro in range(config.grad_accum):
                        positions = micro_positions(step, micro, rank, config, world)
                        batch = s.get(step, micro)
                        assert batch.positions == positions
                        assert_same(batch, reference_batch(dataset_dir, config, positions))
                        assert_same(loader.batch(positions, LATENT_HW),  # the in-process loader agrees
                                    reference_batch(dataset_dir, config, positions))
                assert s.starts == 1 and s.workers == 2  # one DataLoader, read ahead by its workers
            finally:
                s.close()
    # A resumed run: a fresh loader started at step 3 (epoch 2, mid-epoch), micro 1.
    s, _ = stream(dataset_dir, config, end_step=steps + 2)
    try:
        for step, micro in ((3, 1), (4, 0), (4, 1), (5, 0)):
            positions = micro_positions(step, micro, 0, config, 1)
            assert_same(s.get(step, micro), reference_batch(dataset_dir, config, positions))
        assert s.starts == 1
        # Asked for another position than the next one (a resume in the same process): restarts there.
        assert_same(s.get(1, 0), reference_batch(dataset_dir, config, micro_positions(1, 0, 0, config, 1)))
        assert s.starts == 2
    finally:
        s.close()


# -- bounded open files, compact index ---------------------------------------------------------
def write_dataset(folder: Path, shards: int, per_shard: int, payload: int = 64) -> Path:
    """A dataset of tiny synthetic samples (bytes, not images): only the reader is tested."""
    from training.dataset.shards import FORMAT, INDEX, ShardWriter, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    for s in range(shards):
        writer = ShardWriter(folder, f"shard-{s:05d}")
        for k in range(per_shard):
            tag = f"{s}:{k}".encode()
            writer.add(f"{s:05d}{k:04d}", {"json": b'{"n": "' + tag + b'"}', "bin": tag * (payload // len(tag))})
        entries.append(writer.close())
    write_json_atomic(folder / INDEX, {"format": FORMAT, "resolution": 64, "samples": shards * per_shard,
                                       "shards": entries, "face_encoder": {"kind": "x", "dim": 4}})
    return folder


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_open_shard_files_stay_under_the_bound_with_more_shards_than_it(tmp_path):
    from training.dataset.shards import ShardReader

    data = write_dataset(tmp_path / "many", shards=12, per_shard=3)
    reader = ShardReader(data, max_open=3)
    before = open_fds()
    order = np.random.default_rng(0).permutation(36).tolist() * 2
    try:
        for i in order:
            raw = reader.read(i)
            s, k = divmod(i, 3)
            assert raw["__key__"] == f"{s:05d}{k:04d}".encode() and json.loads(raw["json"]) == {"n": f"{s}:{k}"}
            assert raw["bin"].startswith(f"{s}:{k}".encode())
            assert reader.files.open_count() <= 3 and open_fds() - before <= 3
        assert reader.files.opened > 12  # files were closed and reopened, not all kept
    finally:
        reader.close()
    assert open_fds() == before


def test_compact_index_is_memory_mapped_and_follows_the_dataset(tmp_path):
    from training.dataset.shard_index import COMPACT_ARRAY, COMPACT_META
    from training.dataset.shards import ShardReader

    # An "old" dataset: JSON index only. The first open writes the compact index beside it.
    data = write_dataset(tmp_path / "old", shards=3, per_shard=4)
    assert not (data / COMPACT_META).exists()
    first = [ShardReader(data).read(i) for i in range(12)]
    assert (data / COMPACT_META).is_file() and (data / COMPACT_ARRAY).is_file()
    assert not list(data.glob(".*.tmp"))
    mtime = (data / COMPACT_ARRAY).stat().st_mtime_ns
    reader = ShardReader(data)
    assert (data / COMPACT_ARRAY).stat().st_mtime_ns == mtime  # reused, not rebuilt
    assert isinstance(reader.compact.array, np.memmap) and not hasattr(reader, "entries")
    assert [reader.read(i) for i in range(12)] == first
    # A shard rewritten with other samples: the index follows (shard JSON changed).
    from training.dataset.shards import FORMAT, ShardWriter

    writer = ShardWriter(data, "shard-00001")
    writer.add("zz", {"json": b'{"n": "new"}', "bin": b"x"})
    entry = writer.close()
    edit_json(data / "index.json", lambda d: (d["shards"].__setitem__(1, entry), d.update(samples=9)))
    reader = ShardReader(data)
    assert len(reader) == 9 and json.loads(reader.read(4)["json"]) == {"n": "new"}
    assert reader.read(5) == first[8]
    assert json.loads((data / "index.json").read_text())["format"] == FORMAT


def test_index_memory_does_not_grow_with_the_dataset(tmp_path):
    """20k samples: what the reader keeps in Python memory is about what it keeps for 400."""
    from training.dataset.shards import FORMAT, INDEX, write_json_atomic

    def fake(folder: Path, shards: int, per_shard: int) -> Path:
        # Shard JSONs only (the index does not read the tars); offsets as a tar would have them.
        folder.mkdir()
        for s in range(shards):
            samples = {f"{k:08d}": {e: [1024 * k + 512 * (j + 1), 100] for j, e in
                                    enumerate(("emb.npy", "jpg", "json", "mask.png", "ref.png"))}
                       for k in range(per_shard)}
            (folder / f"s{s:04d}.json").write_text(json.dumps({"tar": f"s{s:04d}.tar", "samples": samples}))
        write_json_atomic(folder / INDEX, {"format": FORMAT, "resolution": 64, "samples": shards * per_shard,
                                           "shards": [{"name": f"s{s:04d}", "tar": f"s{s:04d}.tar",
                                                       "count": per_shard} for s in range(shards)]})
        return folder

    from training.dataset.shards import ShardReader

    kept = {}
    for n, folder in ((400, fake(tmp_path / "small", 4, 100)), (20_000, fake(tmp_path / "large", 20, 1000))):
        ShardReader(folder).close()  # writes the compact index
        tracemalloc.start()
        reader = ShardReader(folder)
        assert len(reader) == n and reader.compact.entry(n - 1)[1] == f"{(n - 1) % (n // len(reader.compact.names)):08d}"
        kept[n] = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        reader.close()
    # The JSON index held as dicts costs ~900 bytes a sample (18 MB here); the compact one is
    # mapped from the page cache. Per-shard bookkeeping remains (20 vs 4 shards).
    assert kept[20_000] - kept[400] < 100_000, kept


def test_auto_workers_share_the_node_cpus_among_its_ranks(monkeypatch):
    from training.run.data import loader_workers

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    for local, expected in ((None, 4), ("8", 1), ("16", 0)):
        if local is None:
            monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
        else:
            monkeypatch.setenv("LOCAL_WORLD_SIZE", local)
        assert loader_workers(-1) == expected
    assert loader_workers(3) == 3 and loader_workers(0) == 0


# -- fsspec -------------------------------------------------------------------------------------
@pytest.fixture
def memory_dataset(dataset_dir):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/pb-data-{os.getpid()}"
    for path in dataset_dir.iterdir():
        if path.is_file() and not path.name.startswith("index.compact"):
            fs.pipe_file(f"{root}/{path.name}", path.read_bytes())
    yield f"memory://{root}"
    fs.rm(root, recursive=True)


def test_reads_a_dataset_behind_an_fsspec_url(memory_dataset, dataset_dir, index_cache):
    from training.config import TrainConfig
    from training.run.data import micro_positions
    from training.dataset.shards import ShardReader

    local, remote = ShardReader(dataset_dir), ShardReader(memory_dataset)
    assert remote.location.remote and len(remote) == len(local) == 5
    assert [remote.read(i) for i in range(5)] == [local.read(i) for i in range(5)]
    # Its compact index lives in the local cache (a memory map needs a local file), not in the store.
    assert list(index_cache.glob("*/index.compact.npy"))
    assert not remote.location.fs.exists(f"{remote.location.root}/index.compact.json")
    # The worker pipeline over the URL: the same batches as today's reader on the local copy.
    config = TrainConfig(dataset=memory_dataset, seed=1, micro_batch=2, num_workers=2)
    s, _ = stream(memory_dataset, config, end_step=3)
    try:
        for step in range(3):
            positions = micro_positions(step, 0, 0, config, 1)
            assert_same(s.get(step, 0), reference_batch(dataset_dir, config, positions))
    finally:
        s.close()


def test_a_url_without_fsspec_names_the_package(monkeypatch):
    import sys

    from portraitbooth_core.optional import MissingDependencyError
    from training.dataset.shards import ShardReader

    monkeypatch.setitem(sys.modules, "fsspec", None)
    with pytest.raises(MissingDependencyError, match="pip install fsspec"):
        ShardReader("s3://bucket/dataset")
    with pytest.raises(FileNotFoundError, match="build the dataset"):
        ShardReader("/no/such/dataset")  # a local path never needs fsspec


# -- precomputed latents and text encodings ---------------------------------------------------
def test_encoder_fingerprint_follows_the_vae_and_text_encoder_only(tmp_path):
    from safetensors.torch import save_file

    from training.dataset.precomputed import encoder_fingerprint

    def ckpt(name, unet, vae):
        save_file({"model.diffusion_model.w": torch.full((3,), unet), "first_stage_model.w": torch.full((3,), vae),
                   "cond_stage_model.w": torch.ones(2)}, str(tmp_path / name))
        return encoder_fingerprint(tmp_path / name)

    assert ckpt("a", 1.0, 1.0) == ckpt("b", 2.0, 1.0) != ckpt("c", 1.0, 2.0)


@pytest.fixture(scope="module")
def precomputed(sd15_checkpoint, dataset_dir, tmp_path_factory):
    """A copy of the dataset with precomputed inputs, made with the command line."""
    from conftest import MODELS_DIR
    from training.__main__ import main

    data = tmp_path_factory.mktemp("precomputed") / "data"
    shutil.copytree(dataset_dir, data)
    checkpoint = str(MODELS_DIR / "checkpoints" / sd15_checkpoint)
    assert main(["precompute", str(data), "--model", checkpoint, "--device", "cpu", "--batch-size", "2"]) == 0
    return data


def test_precomputed_inputs_give_the_loss_of_encoding_in_the_step(precomputed, tmp_path):
    from safetensors import safe_open

    from training.run.data import IDENTITY, TEXT_ONLY, UNCOND, draw, micro_batch_rng
    from training.run.trainer import Trainer

    with safe_open(str(precomputed / "precomputed" / "shard-00000.safetensors"), "pt") as f:  # plain safetensors
        assert f.get_tensor("latents").shape == (2, 4, *LATENT_HW) and f.get_tensor("text").shape[1:] == (77, 768)
    t = Trainer(train_config(precomputed, tmp_path / "run", num_workers=1, grad_accum=2))
    try:
        assert t.precomputed is not None
        drawn = {p: draw(p, t.config, t.latent_hw)["mode"] for p in range(200)}
        mixed = [next(p for p in drawn if drawn[p] == mode) for mode in (IDENTITY, TEXT_ONLY, UNCOND)]
        for positions in ([0, 1, 2, 3, 4], mixed):
            batch = t.loader.batch(positions, t.latent_hw)
            assert batch.latents is not None and batch.text is not None
            live = dataclasses.replace(batch, latents=None, text=None)
            # The stored inputs are what the step computes (up to the VAE's batch-size rounding).
            torch.testing.assert_close(batch.latents, t.models.encode_pixels(batch.images), rtol=1e-5, atol=1e-5)
            for i, caption in enumerate(batch.captions):
                torch.testing.assert_close(batch.text[i:i + 1], t.module.text(caption), rtol=0, atol=0)
            losses = []
            for b in (batch, live):
                with torch.no_grad(), micro_batch_rng(0, positions[0], t.dist.device):
                    losses.append({k: float(v) for k, v in t.module(b).items()})
            assert losses[0].keys() == losses[1].keys()
            for k in losses[0]:  # stated tolerance: 1e-5 relative
                assert losses[0][k] == pytest.approx(losses[1][k], rel=1e-5, abs=1e-7), (k, losses)
        # The training step takes its micro-batches, with the precomputed inputs, from the
        # worker pipeline: one DataLoader, in order.
        seen, get = [], t.stream.get
        t.stream.get = lambda step, micro: seen.append(get(step, micro)) or seen[-1]
        t.train_step()
        assert [b.positions for b in seen] == [[0, 1], [2, 3]] and all(b.latents is not None for b in seen)
        assert t.stream.starts == 1 and t.stream.workers == 1
    finally:
        t.close()


def test_models_handed_in_use_precomputed_inputs_only_when_their_encoders_are_the_checkpoints(precomputed, tmp_path):
    # The evidence runs hand the trainer the checkpoint's encoders with their own UNet:
    # the precomputed latents fit them. Encoders of unknown origin must not use them.
    from training.models.load import load_models
    from training.run.trainer import Trainer

    config = train_config(precomputed, tmp_path / "run")
    models = load_models(config, torch.device("cpu"))
    assert models.encoders_from == config.checkpoint
    t = Trainer(config, models=models)
    try:
        assert t.precomputed is not None
    finally:
        t.close()
    t = Trainer(train_config(precomputed, tmp_path / "run2"), models=dataclasses.replace(models, encoders_from=None))
    try:
        assert t.precomputed is None and t.loader.batch([0], t.latent_hw).latents is None
    finally:
        t.close()


def test_a_precompute_older_than_the_dataset_or_of_another_model_is_refused(precomputed, tmp_path):
    from training.dataset.precomputed import MANIFEST, PrecomputedError
    from training.run.trainer import Trainer

    data = tmp_path / "data"
    shutil.copytree(precomputed, data)
    for p in data.glob("index.compact.*"):
        p.unlink()
    # Another model's VAE/text encoder.
    manifest = (data / MANIFEST).read_text()
    edit_json(data / MANIFEST, lambda d: d.update(encoders="0" * 32))
    with pytest.raises(PrecomputedError, match="another VAE/text encoder.*python -m training precompute"):
        Trainer(train_config(data, tmp_path / "run"))
    (data / MANIFEST).write_text(manifest)
    # A sample whose image bytes changed in place (same size: the index cannot see it).
    key = flip_image_byte(data)
    t = Trainer(train_config(data, tmp_path / "run", num_workers=1))
    try:
        index = next(i for i in range(5) if t.reader.read(i)["__key__"].decode() == key)
        position = next(p for p in range(5) if t.loader.order(p) == index)
        with pytest.raises(PrecomputedError, match=f"another version of sample '{key}'"):
            t.loader.batch([position], t.latent_hw)
        # ... and through the worker pipeline (the worker's error reaches the trainer).
        assert t.stream.workers == 1
        with pytest.raises(PrecomputedError, match="another version of sample"):
            for step in range(3):
                t.stream.get(step, 0)
        # precomputed=off: training encodes in the step instead.
        off = Trainer(train_config(data, tmp_path / "run2", precomputed="off"))
        assert off.precomputed is None and off.loader.batch([position], off.latent_hw).latents is None
        off.close()
    finally:
        t.close()
    # The dataset rebuilt: a shard's samples differ. Refused before any model loads.
    edit_json(data / "shard-00001.json", lambda d: d["samples"].pop(sorted(d["samples"])[0]))
    edit_json(data / "index.json", lambda d: (d["shards"][1].update(count=1), d.update(samples=4)))
    with pytest.raises(PrecomputedError, match=r"made before the dataset changed \(1 shard\(s\) differ.*shard-00001"):
        Trainer(train_config(data, tmp_path / "run"))
