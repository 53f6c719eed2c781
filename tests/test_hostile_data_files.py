"""Hostile data files (issue 22): what a dataset's own files say, not only what a graph says.

Anyone who can reach a shared ComfyUI can put any file under input/ (POST /upload/image
takes any bytes) and then queue a DIP Trainer graph on it. So every name field of every
file format the pack reads from a dataset is planted with an absolute name, '../', a
symlink leading out and a NUL byte. The cases are generated from the formats' own
declarations (training.dataset.names.FORMATS, filled by each reader's table), so a new name
field is covered without a new test, and a new format fails test_every_format_has_a_recipe
until it gets one. In-process, each case runs through training.api.check_dataset (what the
node calls before training) while an audit hook records every file open; a representative
set runs through a real server with the files uploaded over HTTP and an audit hook in the
server process. Also: a compact index listing other shards than index.json, an index.json
with 200k shards, deeply nested JSON, and a training run that must write nothing into its
dataset folder under input/.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import struct
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import COMFY_DIR, REPO, SESSION_BASE, TEST_CHECKPOINT  # noqa: F401 - COMFY_DIR: ComfyUI imported
from training_fixtures import *  # noqa: F401,F403

import training.build.journal  # noqa: F401,E402 - fills FORMATS with the journal's fields
import training.dataset.precomputed  # noqa: F401,E402 - and with the dataset files'
from training.dataset.names import FORMATS, NAME, with_value  # noqa: E402

SHARDS = ("shard-00000", "shard-00001")
LINK = "pb_link"  # the planted name whose file is a symlink leading out of the dataset

# -- in-process audit of file opens --------------------------------------------------------------
_seen: list[str] | None = None


def _audit(event: str, args: tuple) -> None:
    if _seen is not None and event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
        _seen.append(os.fsdecode(args[0]))


_hooked = False


@contextlib.contextmanager
def recorded_opens():
    """Every path opened inside the block (sys.addaudithook: a hook cannot be removed, so
    one hook records only while a block runs)."""
    global _seen, _hooked
    if not _hooked:
        sys.addaudithook(_audit)
        _hooked = True
    _seen = found = []
    try:
        yield found
    finally:
        _seen = None


def opened_inside(paths: list[str], folder: Path) -> list[str]:
    """The opened paths whose real path (links followed, as open followed them) is in `folder`."""
    root = os.path.realpath(folder)
    return sorted({p for p in paths if os.path.realpath(p) == root or os.path.realpath(p).startswith(root + os.sep)})


# -- a small dataset holding every format the trainer reads ------------------------------------------
def make_dataset(folder: Path, compact: bool = True, precomputed: bool = True) -> Path:
    """Two shards of two tiny samples (bytes, not images: only the files are read), index.json,
    the compact index beside it, precomputed manifest and side files, a build journal."""
    from training.build.settings import JOURNAL
    from training.dataset.precomputed import (FOLDER, MANIFEST, manifest_bytes, sample_digest, side_file,
                                              side_file_bytes)
    from training.dataset.shard_index import write_compact_index
    from training.dataset.shards import FORMAT, INDEX, ShardReader, ShardWriter, write_json_atomic

    folder.mkdir(parents=True)
    entries = []
    for s, name in enumerate(SHARDS):
        writer = ShardWriter(folder, name)
        for k in range(2):
            writer.add(f"{s:04d}{k:04d}", {"json": json.dumps({"caption": f"a photo {s}{k}"}).encode(),
                                           "jpg": bytes([s, k]) * 16})
        entries.append(writer.close())
    write_json_atomic(folder / INDEX, {"format": FORMAT, "resolution": 64, "samples": 4, "shards": entries,
                                       "face_encoder": {"kind": "arcface", "dim": 4, "recognizer": {
                                           "pack": "standin", "file": "w600k_r50.onnx"}}})
    if compact:
        write_compact_index(folder)
    # a journal as the builder writes it, plus one record in the older "shards" form
    records = [{"people": [{"name": "p0", "samples": 2}], "shard": entries[0], "embedding_dim": 4},
               {"people": [{"name": "p1", "samples": 2}], "shards": [entries[1]], "embedding_dim": 4}]
    (folder / JOURNAL).write_text("".join(json.dumps(r) + "\n" for r in records))
    if not precomputed:
        return folder
    reader = ShardReader(folder)  # the compact index beside it is current: nothing is written
    try:
        digests = {}
        (folder / FOLDER).mkdir()
        for s, name in enumerate(reader.compact.names):
            start, count = reader.compact.rows(s)
            raws = [reader.read(i) for i in range(start, start + count)]
            digests[name] = reader.compact.shard_digest(s)
            data = side_file_bytes(name, digests[name], "enc", "fp16", [r["__key__"].decode() for r in raws],
                                   [sample_digest(r) for r in raws], [json.loads(r["json"])["caption"] for r in raws],
                                   torch.zeros(count, 4, 8, 8), lambda caption: torch.zeros(1, 2, 3))
            (folder / side_file(name)).write_bytes(data)
        (folder / MANIFEST).write_bytes(manifest_bytes("enc", "SD15.safetensors", "fp16", [4, 8, 8], 64, digests))
    finally:
        reader.close()
    return folder


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("base") / "data")


@pytest.fixture(scope="module")
def secret(tmp_path_factory, base) -> Path:
    """Files outside every dataset, in the formats the pack would read: nothing may open them."""
    folder = tmp_path_factory.mktemp("secret")
    shutil.copy(base / "shard-00000.json", folder / "x.json")
    shutil.copy(base / "shard-00000.tar", folder / "x.tar")
    shutil.copy(base / "shard-00000.tar", folder / "x")
    shutil.copy(base / "precomputed" / "shard-00000.safetensors", folder / "x.safetensors")
    shutil.copy(base / "precomputed" / "manifest.json", folder / "manifest.json")
    shutil.copy(base / "index.json", folder / "index.json")
    for name in ("index.compact.json", "index.compact.npy"):
        shutil.copy(base / name, folder / name)
    return folder


def copy_dataset(base: Path, to: Path) -> Path:
    shutil.copytree(base, to, symlinks=True)  # copy2: mtimes kept, so the compact index stays current
    return to


# -- planting a value into a field of each format ---------------------------------------------------
def _st_header(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _plant_json(rel: str):
    def plant(folder: Path, path: str, value) -> bool:
        doc = with_value(json.loads((folder / rel).read_text()), path, value)
        if doc is None:
            return False
        (folder / rel).write_text(json.dumps(doc))
        return True
    return plant


def _plant_side_file(folder: Path, path: str, value) -> bool:
    target = folder / "precomputed" / "shard-00000.safetensors"
    header, data = _st_header(target)
    header = with_value(header, path, value)
    if header is None:
        return False
    raw = json.dumps(header).encode()
    target.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return True


def _plant_journal(folder: Path, path: str, value) -> bool:
    target = folder / "build_journal.jsonl"
    records = [json.loads(line) for line in target.read_text().splitlines()]
    for n, record in enumerate(records):
        changed = with_value(record, path, value)
        if changed is not None:
            records[n] = changed
            target.write_text("".join(json.dumps(r) + "\n" for r in records))
            return True
    return False


def _check_dataset(folder: Path, cache: Path):
    from training import api

    return api.check_dataset(folder, index_cache=cache)


def _read_journal(folder: Path, cache: Path):
    """The journal's reader and what merge opens from it (the parts' shard tars)."""
    from training.build.journal import journal_records
    from training.build.merge import _shard_samples

    for record in journal_records(folder):
        for shard in [record["shard"]] if record.get("shard") else record.get("shards", []):
            list(_shard_samples(folder, shard["tar"]))


# FORMATS key -> (the file planted, how to plant a value, the code that reads it)
RECIPES = {
    "index.json": ("index.json", _plant_json("index.json"), _check_dataset),
    "<shard>.json": ("shard-00000.json", _plant_json("shard-00000.json"), _check_dataset),
    "index.compact.json": ("index.compact.json", _plant_json("index.compact.json"), _check_dataset),
    "precomputed/manifest.json": ("manifest.json", _plant_json("precomputed/manifest.json"), _check_dataset),
    "precomputed/<shard>.safetensors": ("shard-00000.safetensors", _plant_side_file, _check_dataset),
    "build_journal.jsonl": ("build_journal.jsonl", _plant_journal, _read_journal),
}
KINDS = ("absolute", "dotdot", "symlink", "nul")
CASES = [(file, field, kind) for file, fields in FORMATS.items() for field in fields for kind in KINDS]


def hostile_value(kind: str, secret: Path, target: str = "x") -> str:
    if kind == "absolute":
        return str(secret / target)
    if kind == "dotdot":
        return "../" * 10 + str(secret / target).lstrip("/")
    return {"symlink": LINK, "nul": "x\x00y"}[kind]


def plant_links(folder: Path, field, secret: Path) -> None:
    """The symlink case: every file the field's value would open, as a link to a secret file."""
    for rel in field.targets(LINK):
        link = folder / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(secret / ("x" + "".join(Path(rel).suffixes)))


def _last_key(path: str) -> str:
    return re.findall(r"[A-Za-z_]+", path.replace("|json", ""))[-1]


def _run(reader, folder: Path, cache: Path) -> tuple[Exception | None, list[str]]:
    with recorded_opens() as seen:
        try:
            reader(folder, cache)
            error = None
        except Exception as exc:  # noqa: BLE001 - the test judges the type
            error = exc
    return error, seen


def test_every_format_has_a_recipe():
    """A format declared with name_fields but unknown here would go untested."""
    assert set(FORMATS) == set(RECIPES), set(FORMATS) ^ set(RECIPES)
    assert sum(len(f) for f in FORMATS.values()) >= 14


@pytest.mark.parametrize("file,field,kind", CASES, ids=[f"{f}:{fd.path}:{k}" for f, fd, k in CASES])
def test_every_name_field_refuses_hostile_values(tmp_path, base, secret, file, field, kind):
    from portraitbooth_core.paths import BadInputError, PathNotAllowedError

    shown, plant, reader = RECIPES[file]
    folder = copy_dataset(base, tmp_path / "data")
    if not plant(folder, field.path, hostile_value(kind, secret)):
        pytest.fail(f"the test dataset has no {field.path} in {file}: make_dataset must write one")
    if kind == "symlink":
        plant_links(folder, field, secret)
    error, seen = _run(reader, folder, tmp_path / "cache")
    assert not opened_inside(seen, secret), f"opened outside the dataset: {opened_inside(seen, secret)}"
    # The ISSUE: raw KeyError / FileNotFoundError / RecursionError; a typed error names the file and field.
    assert error is None or isinstance(error, (BadInputError, PathNotAllowedError)), repr(error)
    harmless = kind == "symlink" and (field.kind == NAME or not field.opens or file == "build_journal.jsonl")
    if harmless:
        return  # a plain name that opens nothing in the dataset (or is opened only by merge, under its part)
    assert error is not None, f"{file} {field.path}={hostile_value(kind, secret)!r} was accepted"
    assert shown in str(error), str(error)
    if kind != "symlink":  # a link is found when its file is opened, or its name differs from index.json's
        assert _last_key(field.path) in str(error), str(error)
        assert "\x00" not in str(error)
    if kind in ("absolute", "dotdot"):
        # the same answer whether or not the named file exists: no "does this path exist" oracle
        again = copy_dataset(base, tmp_path / "again")
        missing = hostile_value(kind, secret, "not-there")
        plant(again, field.path, missing)
        other, _ = _run(reader, again, tmp_path / "cache2")
        assert type(other) is type(error)
        assert str(other).replace(missing, "V").replace(str(again), "D") == \
            str(error).replace(hostile_value(kind, secret), "V").replace(str(folder), "D")


OPENED_FILES = ["index.json", "shard-00000.json", "shard-00000.tar", "index.compact.json", "index.compact.npy",
                "precomputed/manifest.json", "precomputed/shard-00000.safetensors"]


@pytest.mark.parametrize("rel", OPENED_FILES)
def test_a_dataset_file_that_is_a_symlink_out_is_refused_target_or_not(tmp_path, base, secret, rel):
    from portraitbooth_core.paths import PathNotAllowedError

    messages = []
    for target in (secret / Path(rel).name, secret / "not-there"):
        folder = copy_dataset(base, tmp_path / target.name)
        (folder / rel).unlink()
        (folder / rel).symlink_to(target)
        error, seen = _run(_check_dataset, folder, tmp_path / "cache")
        assert not opened_inside(seen, secret), opened_inside(seen, secret)
        assert isinstance(error, PathNotAllowedError), repr(error)
        messages.append(str(error).replace(str(folder), "D"))
    assert messages[0] == messages[1]


# -- the compact index ----------------------------------------------------------------------------
@pytest.mark.parametrize("change", ["escape", "renamed", "dropped", "swapped", "count", "tar"])
def test_a_compact_index_listing_other_shards_than_index_json_is_refused(tmp_path, base, secret, change):
    """A compact index claims index.json's fingerprint (anyone can compute it): its shard list
    is compared with index.json's. The issue's case ("escape"): a shard name leading to a
    side file elsewhere, whose header and tensors were read."""
    from training.dataset.shard_index import CompactIndexError

    folder = copy_dataset(base, tmp_path / "data")
    meta_path = folder / "index.compact.json"
    meta = json.loads(meta_path.read_text())
    shards = meta["shards"]
    if change == "escape":
        escape = "../" * 8 + str(secret / "x").lstrip("/")
        shards[0].update(name=escape, json=escape + ".json")
    elif change == "renamed":
        shards[0].update(name="shard-99999", json="shard-99999.json")
    elif change == "dropped":
        meta["samples"] -= shards.pop()["count"]
    elif change == "swapped":
        shards.reverse()
    elif change == "count":
        shards[0]["count"] += 1
        meta["samples"] += 1
    else:
        shards[0]["tar"] = shards[1]["tar"]
    meta_path.write_text(json.dumps(meta))
    error, seen = _run(_check_dataset, folder, tmp_path / "cache")
    assert not opened_inside(seen, secret), opened_inside(seen, secret)
    assert isinstance(error, (CompactIndexError, PermissionError)), repr(error)
    assert "index.compact.json" in str(error) and "shards" in str(error)


def test_the_node_keeps_the_compact_index_in_its_cache_reused_verified_and_remade(tmp_path, base):
    from training import api
    from training.dataset.shard_index import COMPACT_META

    folder = copy_dataset(base, tmp_path / "data")
    for name in ("index.compact.json", "index.compact.npy"):
        (folder / name).unlink()  # a dataset uploaded without one
    before = {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")}
    cache = tmp_path / "cache"
    assert api.check_dataset(folder, index_cache=cache) == 4
    assert {p.name: p.stat().st_mtime_ns for p in folder.rglob("*")} == before  # nothing written beside it
    [meta_path] = cache.glob(f"*/{COMPACT_META}")
    made = meta_path.stat().st_mtime_ns
    assert api.check_dataset(folder, index_cache=cache) == 4 and meta_path.stat().st_mtime_ns == made  # reused
    # A poisoned cache entry (current fingerprint, other names) is not trusted: made again.
    meta = json.loads(meta_path.read_text())
    meta["shards"][0]["name"] = "../" * 6 + "etc/passwd"
    meta_path.write_text(json.dumps(meta))
    assert api.check_dataset(folder, index_cache=cache) == 4
    assert json.loads(meta_path.read_text())["shards"][0]["name"] == SHARDS[0]
    # A changed dataset (a shard rewritten): the cached index is stale, made again.
    from training.dataset.shards import ShardWriter
    from training_fixtures import edit_json

    writer = ShardWriter(folder, SHARDS[1])
    writer.add("zz", {"json": b'{"caption": "new"}', "jpg": b"x"})
    entry = writer.close()
    edit_json(folder / "index.json", lambda d: (d["shards"].__setitem__(1, entry), d.update(samples=3)))
    shutil.rmtree(folder / "precomputed")  # made for the old shards
    assert api.check_dataset(folder, index_cache=cache) == 3
    assert json.loads(meta_path.read_text())["samples"] == 3


# -- sizes, counts, depth --------------------------------------------------------------------------
def _index_with_shards(count: int) -> bytes:
    from training.dataset.shards import FORMAT

    shards = ",".join(f'{{"name":"shard{i:06d}"}}' for i in range(count))  # ~22 bytes a shard
    return f'{{"format":"{FORMAT}","resolution":64,"samples":{count},"shards":[{shards}]}}'.encode()


def test_an_index_json_with_200k_shards_is_refused_in_under_a_second(tmp_path):
    from portraitbooth_core.paths import BadInputError
    from training import api
    from training.dataset.storage import DatasetFileError

    folder = tmp_path / "big"
    folder.mkdir()
    data = _index_with_shards(200_000)
    assert 4_000_000 < len(data) < 5_000_000
    (folder / "index.json").write_bytes(data)
    start = time.perf_counter()
    with pytest.raises(DatasetFileError, match=r"index.json: 'shards' lists 200,000 shards, more than the 100,000"):
        api.check_dataset(folder, index_cache=tmp_path / "cache")
    assert time.perf_counter() - start < 1.0
    # A file larger than index.json may be is refused unread (not parsed).
    (folder / "index.json").write_bytes(b" " * (33 << 20))
    start = time.perf_counter()
    with pytest.raises(BadInputError, match=r"index.json is larger than the 33,554,432 bytes allowed"):
        api.check_dataset(folder, index_cache=tmp_path / "cache")
    assert time.perf_counter() - start < 1.0


DEEP = "[" * 20_000 + "]" * 20_000


def test_deep_nesting_is_a_message_naming_the_file_not_a_recursion_error(tmp_path, base):
    from safetensors.torch import save_file

    from portraitbooth_core.face.identity_file import METADATA_KEY, IdentityFileError, read_identity_header
    from portraitbooth_core.paths import BadInputError
    from portraitbooth_core.weights.safetensors_header import SafetensorsHeaderError, read_header
    from training import api
    from training.dataset.precomputed import PrecomputedError
    from training.dataset.storage import DatasetFileError

    deep_index = copy_dataset(base, tmp_path / "index")
    (deep_index / "index.json").write_text('{"format": "portraitbooth-shards/1", "shards": [], "x": %s}' % DEEP)
    with pytest.raises(BadInputError, match=r"index.json is nested 20001 levels deep, more than the 64 allowed"):
        api.check_dataset(deep_index, index_cache=tmp_path / "cache")
    deep_manifest = copy_dataset(base, tmp_path / "manifest")
    (deep_manifest / "precomputed" / "manifest.json").write_text('{"shards": %s}' % DEEP)
    with pytest.raises(BadInputError, match=r"manifest.json is nested"):
        api.check_dataset(deep_manifest, index_cache=tmp_path / "cache")
    deep_keys = copy_dataset(base, tmp_path / "keys")
    _plant_side_file(deep_keys, "__metadata__.keys", DEEP)
    with pytest.raises(BadInputError, match=r"shard-00000.safetensors field '__metadata__.keys' is nested"):
        api.check_dataset(deep_keys, index_cache=tmp_path / "cache")
    assert issubclass(PrecomputedError, DatasetFileError)
    # An identity file whose metadata nests deeply (what Load Identity reads from input/).
    identity = tmp_path / "deep_identity.safetensors"
    save_file({"embedding": torch.zeros(4)}, str(identity), metadata={METADATA_KEY: '{"metadata": %s}' % DEEP})
    with pytest.raises(IdentityFileError, match=r"deep_identity.safetensors: its identity metadata is nested"):
        read_identity_header(identity)
    # A safetensors header that nests deeply: refused by the one header reader every weight file goes through.
    raw = ('{"a": %s}' % DEEP).encode()
    (tmp_path / "deep_header.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw)
    with pytest.raises(SafetensorsHeaderError, match=r"deep_header.safetensors is corrupt or not a safetensors file "
                                                     r"\(header is nested too deeply"):
        read_header(tmp_path / "deep_header.safetensors")
    # A deeply nested value in the DIP Trainer's extra_settings.
    with pytest.raises(api.SettingsError, match=r"extra_settings line 1: lora_targets is nested"):
        api.settings_from_text(f"lora_targets={DEEP}")


def test_the_depth_scan_counts_brackets_outside_strings_only():
    import random

    from portraitbooth_core.bounded_json import nesting_depth

    def depth(value) -> int:
        if isinstance(value, dict):
            value = list(value.values())
        return 1 + max([depth(v) for v in value] or [0]) if isinstance(value, list) else 0

    rng = random.Random(0)
    texts = ['a"[', "\\", '\\"{', "]]}", "x", '"', "\\\\\"[["]

    def make(level: int):
        if level == 0 or rng.random() < 0.25:
            return rng.choice([*texts, 1, None])
        if rng.random() < 0.5:
            return [make(level - 1) for _ in range(rng.randint(0, 3))]
        return {rng.choice(texts): make(level - 1) for _ in range(rng.randint(0, 2))}

    for _ in range(1500):
        value = make(7)
        assert nesting_depth(json.dumps(value).encode()) == depth(value), json.dumps(value)


# -- through a real server: files uploaded over HTTP, an audit hook in the server ---------------------
@pytest.fixture(scope="module")
def served(tmp_path_factory, base, secret, sd15_checkpoint):
    """A server recording every file it opens (the hostile-graph suite's audit hook)."""
    from conftest import started_server
    from test_hostile_graphs import SITECUSTOMIZE

    work = tmp_path_factory.mktemp("served")
    audit = work / "audit"
    audit.mkdir()
    (audit / "sitecustomize.py").write_text(SITECUSTOMIZE)
    log = work / "audit.log"
    tmp = work / "comfy" / "tmp"  # the server's own temporary files stay inside its work dir
    tmp.mkdir(parents=True)
    env = {"PYTHONPATH": os.pathsep.join([str(audit), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "PB_AUDIT_LOG": str(log), "TMPDIR": str(tmp)}
    server = started_server(work / "comfy", env=env)
    try:
        yield {"server": server, "log": log, "work": work / "comfy", "base": work, "secret": secret}
    finally:
        server.stop()


def upload_dataset(client, folder: Path, subfolder: str, skip=()) -> None:
    """Every file of `folder` into input/<subfolder>/ through POST /upload/image."""
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if path.is_file() and rel.name not in skip:
            client.upload_image(path, name=rel.name, subfolder="/".join([subfolder, *rel.parts[:-1]]))


def claim_current(client, local: Path, uploaded: Path, subfolder: str) -> None:
    """Give the uploaded compact index the fingerprint of the uploaded files (their upload
    mtimes are in it), so the server takes it as current and its contents are what is tested."""
    from training.dataset.shard_index import fingerprint
    from training.dataset.storage import DatasetLocation

    try:
        raw = (uploaded / "index.json").read_bytes()
        fp = fingerprint(DatasetLocation(uploaded), json.loads(raw), raw)
    except Exception:  # noqa: BLE001 - an index.json planted with a bad name: no compact index is read
        return
    meta = json.loads((local / "index.compact.json").read_text())
    meta["fingerprint"] = fp
    (local / "index.compact.json").write_text(json.dumps(meta))
    client.upload_image(local / "index.compact.json", subfolder=subfolder)


def _trainer_graph(server, dataset: str, name: str, **over) -> dict:
    from test_hostile_graphs import _defaults, _pack_nodes

    inputs = dict(_defaults(_pack_nodes(server.client.object_info())["PortraitBoothDIPTrainer"]),
                  ckpt_name=TEST_CHECKPOINT, dataset=dataset, steps=1, output_name=name, **over)
    return {"1": {"class_type": "PortraitBoothDIPTrainer", "inputs": inputs}}


def _outside(served: dict, start: int) -> list[str]:
    from test_hostile_graphs import _outside as outside

    return outside(served, start)


@pytest.mark.slow  # a server of its own
def test_hostile_dataset_files_uploaded_over_http_are_refused_and_nothing_outside_is_opened(tmp_path, served, base,
                                                                                            secret):
    from headless.client import ComfyError

    server = served["server"]
    start = len(served["log"].read_text(errors="replace").splitlines())
    cases = []  # (input subfolder, the file its error must name)
    n = 0
    for file, fields in FORMATS.items():
        shown, plant, reader = RECIPES[file]
        if reader is not _check_dataset:
            continue  # the trainer reads no journal
        for field in fields:
            folder = copy_dataset(base, tmp_path / f"case{n}")
            plant(folder, field.path, hostile_value(("absolute", "dotdot")[n % 2], secret))
            if file != "index.compact.json":  # the server then reads the file planted, not a compact index
                for name in ("index.compact.json", "index.compact.npy"):
                    (folder / name).unlink()
            cases.append((folder, f"hostile{n}", shown))
            n += 1
    escape = copy_dataset(base, tmp_path / "escape")  # the compact index, uploaded with its dataset
    edit = "../" * 8 + str(secret / "x").lstrip("/")
    meta = json.loads((escape / "index.compact.json").read_text())
    meta["shards"][0].update(name=edit, json=edit + ".json")
    (escape / "index.compact.json").write_text(json.dumps(meta))
    cases.append((escape, "hostile_escape", "index.compact.json"))
    big = tmp_path / "big"
    big.mkdir()
    (big / "index.json").write_bytes(_index_with_shards(200_000))
    cases.append((big, "hostile_big", "200,000 shards"))
    deep = tmp_path / "deep"
    deep.mkdir()
    (deep / "index.json").write_text('{"format": "portraitbooth-shards/1", "shards": %s}' % DEEP)
    cases.append((deep, "hostile_deep", "nested"))
    for folder, subfolder, _ in cases:
        upload_dataset(server.client, folder, subfolder)
        if (folder / "index.compact.json").is_file():
            claim_current(server.client, folder, server.input_dir / subfolder, subfolder)
    queued = [(server.client.submit(_trainer_graph(server, sub, f"hostile_{os.getpid()}_{i}")), sub, words)
              for i, (_, sub, words) in enumerate(cases)]
    problems = []
    for prompt_id, sub, words in queued:
        try:
            server.client.wait(prompt_id, timeout=120)
            problems.append(f"{sub}: trained although its files name what they may not")
        except ComfyError as exc:
            text = str(exc)  # "node 1 (...) failed: <exception type>: <message>"
            if "dataset: " not in text or words not in text:
                problems.append(f"{sub}: refused without naming the input and {words!r}: {text[:400]}")
            if re.search(r"failed: (KeyError|FileNotFoundError|RecursionError|TypeError|IndexError):", text):
                problems.append(f"{sub}: a raw error: {text[:300]}")
    assert not problems, "\n".join(problems)
    assert len(queued) >= 14
    bad = _outside(served, start)
    assert not bad, "opened outside the allowed roots:\n" + "\n".join(bad[:40])
    log = served["log"].read_text(errors="replace")
    assert str(secret) not in log
    # the hook does record: the node read the uploaded index.json before refusing it
    assert f"open\t{os.path.realpath(server.input_dir / 'hostile0' / 'index.json')}" in log
    assert server.client.get_json("/system_stats")


@pytest.mark.slow  # a server of its own
def test_training_a_dataset_under_input_writes_nothing_into_it(served, dataset_dir):
    """The compact index of a dataset under input/ lands in ComfyUI's temp folder."""
    server = served["server"]
    start = len(served["log"].read_text(errors="replace").splitlines())
    upload_dataset(server.client, dataset_dir, "uploaded", skip=("index.compact.json", "index.compact.npy"))
    folder = server.input_dir / "uploaded"
    before = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}
    name = f"upload_{os.getpid()}"
    graph = _trainer_graph(server, "uploaded", name, batch_size=1, lora_rank=4, save_every=1,
                           extra_settings="id_weight=0")
    target = SESSION_BASE / "models" / "portraitbooth" / f"{name}.safetensors"
    try:
        result = server.client.run(graph, timeout=600)
        assert target.is_file() and f"{name}.safetensors" in json.dumps(result.outputs)  # it trained and saved
        after = {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}
        assert after == before, sorted(set(after) ^ set(before))
        assert list((server.temp_dir / "portraitbooth" / "dataset-index").glob("*/index.compact.npy"))
    finally:
        target.unlink(missing_ok=True)
    bad = _outside(served, start)
    assert not bad, "opened outside the allowed roots:\n" + "\n".join(bad[:40])
