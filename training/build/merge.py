"""Join the parts of a split build (`python -m training build --part i/N`) into one dataset.

    python -m training merge data/ part0/ part1/ ... [--overwrite]

The parts' samples are copied in people order through the builder's own DatasetWriter,
so keys, shard boundaries, index.json, report.json and the journal are those a single
`build` of the whole source writes. Parts are checked first: one build (same settings and
face encoder, same source listing), every part 0..N-1 exactly once, each finished, no
person in two parts. The output folder is never replaced without `overwrite`.

Precomputed inputs (`python -m training precompute PART --model SD15` run on each part, to
spread the VAE encode over machines) are carried when every part has a complete set made
with the same VAE/text encoder, dtype and latent shape: the parts' stored rows are checked
against the samples as they are copied (key and sample digest), then re-packed by
precompute's own writer into side files for the merged shards, with a manifest tied to the
merged index, i.e. what `precompute` on the merged dataset would keep. Otherwise none are
written, and the returned report's `precomputed` entry names the parts and the command.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

import torch

from portraitbooth_core.bounded_json import read_json_file
from portraitbooth_core.paths import inside

from ..dataset import precomputed as pre
from ..dataset.samples import sample_meta
from ..dataset.shards import INDEX, ShardReader, write_json_atomic
from .journal import DatasetWriter, Journal, journal_records, write_dataset_files
from .settings import JOURNAL, REPORT, STATE, STATE_FORMAT, record_digest, state_differences


class MergeError(ValueError):
    """Parts that cannot be merged, or an output that is in the way; the message says why and what to do."""


def _part_info(folder: Path) -> dict:
    state_path = folder / STATE
    if not state_path.is_file():
        raise MergeError(f"{folder} is not a dataset part: it has no {STATE}. Give the folders that "
                         f"`python -m training build --part i/N` wrote.")
    state = read_json_file(state_path, str(state_path), max_bytes=64 << 20)
    if not state.get("part"):
        raise MergeError(f"{folder} holds a whole build (made without --part), not a part; it needs no merge.")
    i, n = state["part"]
    complete = state.get("complete")
    count = sum(1 for _ in journal_records(folder))
    if not complete or complete.get("records") != count or not (folder / INDEX).is_file():
        raise MergeError(f"part {i}/{n} in {folder} is not finished: run the same `python -m training build "
                         f"... --part {i}/{n}` into {folder} again to finish it, then merge.")
    from ..dataset.index_file import MAX_INDEX_BYTES, check_index

    index = read_json_file(folder / INDEX, str(folder / INDEX), MAX_INDEX_BYTES)
    check_index(index, str(folder / INDEX))
    return {"folder": folder, "state": state, "part": (int(i), int(n)), "index": index}


def check_parts(parts: list[Path]) -> list[dict]:
    """The parts' records in part order, after every check a merge needs."""
    if not parts:
        raise MergeError("no part folders given")
    infos = [_part_info(Path(p)) for p in parts]
    first = infos[0]
    n = first["part"][1]
    for info in infos[1:]:
        if info["part"][1] != n:
            raise MergeError(f"{first['folder']} is part {first['part'][0]}/{n} but {info['folder']} is part "
                             f"{info['part'][0]}/{info['part'][1]}: parts of one build share N.")
        if info["state"]["fingerprint"] != first["state"]["fingerprint"]:
            what = "; ".join(state_differences(first["state"]["identity"], info["state"]["identity"]))
            raise MergeError(f"{info['folder']} was built with other settings than {first['folder']} ({what}; "
                             f"'recorded' is {first['folder'].name}, 'now' is {info['folder'].name}). Build every "
                             f"part with the same settings and face encoder.")
        if info["state"].get("listing") != first["state"].get("listing"):
            raise MergeError(f"{info['folder']} and {first['folder']} split different source listings "
                             f"({info['state'].get('listing')} vs {first['state'].get('listing')}): each part "
                             f"is a range of the sorted people folders, so they would overlap or miss people. "
                             f"Build every part from the same source folder.")
    by_index: dict[int, dict] = {}
    for info in infos:
        i = info["part"][0]
        if i in by_index:
            raise MergeError(f"{by_index[i]['folder']} and {info['folder']} are both part {i}/{n}; give each part "
                             f"once.")
        by_index[i] = info
    missing = [i for i in range(n) if i not in by_index]
    if missing:
        raise MergeError(f"part(s) {', '.join(f'{i}/{n}' for i in missing)} missing: a merge needs all {n} parts "
                         f"(given: {', '.join(f'{i}/{n}' for i in sorted(by_index))}).")
    owner: dict[str, Path] = {}
    for i in range(n):
        for record in journal_records(by_index[i]["folder"]):
            if record.get("legacy"):
                raise MergeError(f"{by_index[i]['folder']} was started by an older version that did not record "
                                 f"sample counts per person; build that part again into a new folder.")
            for person in record["people"]:
                if person["name"] in owner:
                    raise MergeError(f"person '{person['name']}' is in both {owner[person['name']]} and "
                                     f"{by_index[i]['folder']}: the parts overlap.")
                owner[person["name"]] = by_index[i]["folder"]
    return [by_index[i] for i in range(n)]


def _shard_samples(folder: Path, tar_name: str) -> Iterator[tuple[str, dict]]:
    """(key, members) of the samples of one shard in order, members in their written order."""
    sample, key = {}, None
    # the name is a journal's: opened only inside the part's folder
    with tarfile.open(inside(folder, tar_name, f"{folder / JOURNAL} shard.tar"), "r:") as tar:
        for member in tar:
            k, ext = member.name.split(".", 1)
            if k != key and sample:
                yield key, sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield key, sample


def _prepare_output(output: Path, parts: list[Path], overwrite: bool) -> None:
    resolved = output.resolve()
    for part in parts:
        if Path(part).resolve() == resolved:
            raise MergeError(f"the output {output} is one of the parts; merge into a new folder.")
    if output.exists() and any(output.iterdir()):
        if not overwrite:
            raise MergeError(f"{output} exists and is not empty; merge into a new folder, or pass --overwrite to "
                             f"replace the dataset in it.")
        for path in output.iterdir():  # only what a build writes; anything else stays
            name = path.name
            if name in (INDEX, REPORT, STATE, JOURNAL) or (name.startswith("shard-") and path.is_file()) or \
                    (name.startswith(".") and name.endswith(".tmp")):
                path.unlink()
            elif path.is_dir() and name.startswith("shard-"):
                shutil.rmtree(path)
        # the replaced dataset's precomputed inputs (what precompute or merge wrote there)
        folder = output / pre.FOLDER
        if folder.is_dir():
            for path in folder.iterdir():
                name = path.name
                if path.is_file() and (name == Path(pre.MANIFEST).name or (name.startswith("shard-") and
                                       name.endswith(".safetensors")) or (name.startswith(".") and
                                                                          name.endswith(".tmp"))):
                    path.unlink()
            if not any(folder.iterdir()):
                folder.rmdir()
    output.mkdir(parents=True, exist_ok=True)


# -- precomputed inputs ----------------------------------------------------------------------
def _label(info: dict) -> str:
    i, n = info["part"]
    return f"part {i}/{n} ({info['folder']})"


class _PrecomputedCarry:
    """The parts' precomputed inputs on their way into the merged dataset. `reason` (and the
    parts at fault) is set as soon as they cannot be carried; the merge itself goes on."""

    AGREE = ("encoders", "dtype", "latent_shape", "resolution")

    def __init__(self, output: Path, infos: list[dict]):
        self.output, self.infos = output, infos
        self.reason: str | None = None
        self.at_fault: list[Path] = []
        self.manifests: list[dict] = []
        self._rows: tuple[dict, str, list[str], torch.Tensor] | None = None  # the part shard being checked
        found = {}
        for info in infos:
            path = info["folder"] / pre.MANIFEST
            if path.is_file():
                try:
                    found[id(info)] = read_json_file(path, str(path), pre.MAX_MANIFEST_BYTES)
                except (OSError, ValueError) as exc:
                    found[id(info)] = {"unreadable": f"{type(exc).__name__}: {str(exc)[:120]}"}
        self.checkpoint = next((m["checkpoint"] for m in found.values() if isinstance(m, dict) and
                                isinstance(m.get("checkpoint"), str)), "SD15.safetensors")
        self.command = f"python -m training precompute {output} --model {self.checkpoint}"
        without = [info for info in infos if id(info) not in found]
        if len(without) == len(infos):
            self.fail(without, "none of the parts has precomputed inputs")
            return
        if without:
            having = ", ".join(f"{i['part'][0]}/{i['part'][1]}" for i in infos if id(i) in found)
            self.fail(without, f"{', '.join(_label(i) for i in without)} {'has' if len(without) == 1 else 'have'} "
                               f"none (no {pre.MANIFEST}: not precomputed, or its precompute did not finish), "
                               f"while part(s) {having} have them")
            return
        for info in infos:
            manifest = found[id(info)]
            shards = {s["name"] for s in info["index"]["shards"]}
            if not isinstance(manifest, dict) or manifest.get("format") != pre.FORMAT or \
                    manifest.get("dtype") not in pre.DTYPES:
                what = manifest.get("unreadable") if isinstance(manifest, dict) and "unreadable" in manifest else \
                    f"format {manifest.get('format') if isinstance(manifest, dict) else '?'!r}, dtype " \
                    f"{manifest.get('dtype') if isinstance(manifest, dict) else '?'!r}; this version writes " \
                    f"{pre.FORMAT}, dtype one of {sorted(pre.DTYPES)}"
                self.fail([info], f"{_label(info)} has a {pre.MANIFEST} this version cannot use ({what})")
                return
            if set(manifest.get("shards") or {}) != shards:
                self.fail([info], f"{_label(info)}: its precomputed inputs were made before the part was built "
                                  f"again (their shards are not the part's)")
                return
            self.manifests.append(manifest)
        first = self.manifests[0]
        for info, manifest in zip(infos[1:], self.manifests[1:]):
            differ = [k for k in self.AGREE if manifest.get(k) != first.get(k)]
            if differ:
                self.fail([info], f"{_label(info)} was precomputed with other settings than {_label(infos[0])}: "
                                  + "; ".join(f"{k} {manifest.get(k)} vs {first.get(k)}" for k in differ)
                                  + " (each part must be precomputed with the same checkpoint's VAE/text encoder "
                                    "and --dtype)")
                return

    @property
    def active(self) -> bool:
        return self.reason is None

    def fail(self, infos: list[dict], reason: str) -> None:
        if self.reason is None:
            self.reason, self.at_fault = reason, [i["folder"] for i in infos]

    def start_shard(self, n: int, info: dict, shard: dict) -> None:
        """Before the samples of a part's shard: its side file's keys and sample digests."""
        from safetensors import safe_open

        if not self.active:
            return
        manifest = self.manifests[n]
        name = pre.side_file(shard["name"])
        try:
            with safe_open(str(inside(info["folder"], name, f"{info['folder'] / JOURNAL} shard.name")), "pt") as f:
                meta = f.metadata() or {}
                digests = f.get_tensor("digest")
            keys = json.loads(meta.get("keys", "[]"))
        except Exception as exc:  # a missing or damaged side file: safetensors raises its own error type
            self.fail([info], f"{_label(info)} lacks a readable {name} ({type(exc).__name__}: {str(exc)[:120]})")
            return
        if (meta.get("format"), meta.get("index_digest"), meta.get("encoders"), meta.get("dtype")) != \
                (pre.FORMAT, manifest["shards"][shard["name"]], manifest["encoders"], manifest["dtype"]) or \
                len(keys) != shard["count"] or tuple(digests.shape) != (shard["count"], 16):
            self.fail([info], f"{_label(info)}: {name} does not match its manifest or shard (an interrupted "
                              f"precompute, or one of another build of the part)")
            return
        self._rows = (info, shard["name"], keys, digests)

    def check(self, row: int, key: str, sample: dict) -> None:
        """A copied sample is the one its part's stored row was made from."""
        if not self.active:
            return
        info, shard, keys, digests = self._rows
        if row >= len(keys) or keys[row] != key or bytes(digests[row].tolist()) != pre.sample_digest(sample):
            self.fail([info], f"{_label(info)}: its precomputed inputs were made from another version of sample "
                              f"{key!r} of {shard} (its image or caption changed since)")

    def _sources(self) -> Iterator[tuple[Path, int]]:
        """(part side file, row) of every merged sample, in merged order (the copy's order)."""
        for info in self.infos:
            for record in journal_records(info["folder"]):
                shard = record.get("shard")
                if shard:
                    for row in range(shard["count"]):
                        yield inside(info["folder"], pre.side_file(shard["name"]),
                                     f"{info['folder'] / JOURNAL} shard.name"), row

    def write(self) -> dict:
        """Side files of the merged shards from the parts' rows, then the manifest."""
        from safetensors import safe_open

        first = self.manifests[0]
        reader = ShardReader(self.output)
        opened: dict[Path, object] = {}
        try:
            compact = reader.compact
            sources = self._sources()
            digests, total = {}, 0
            for s, shard_name in enumerate(compact.names):
                start, count = compact.rows(s)
                keys, sample_digests, captions, latents, texts, empty = [], [], [], [], {}, None
                for i in range(start, start + count):
                    path, row = next(sources)
                    if path not in opened:  # the parts' shards are met in order: only the current one is open
                        opened.clear()
                        opened[path] = safe_open(str(path), "pt")
                    part = opened[path]
                    _, key, members = compact.entry(i)
                    offset, size = members["json"]
                    caption = sample_meta({"__key__": key.encode(),
                                           "json": reader.files.read(compact.tars[s], offset, size)})["caption"]
                    keys.append(key)
                    captions.append(caption)
                    sample_digests.append(bytes(part.get_slice("digest")[row:row + 1][0].tolist()))
                    latents.append(part.get_slice("latents")[row:row + 1])
                    if caption not in texts:  # one encoding per caption, as precompute stores it
                        text_row = int(part.get_slice("text_row")[row:row + 1][0])
                        texts[caption] = part.get_slice("text")[text_row:text_row + 1]
                    if empty is None:
                        empty = part.get_slice("text")[0:1]
                texts.setdefault("", empty)
                data = pre.side_file_bytes(shard_name, compact.shard_digest(s), first["encoders"], first["dtype"],
                                           keys, sample_digests, captions,
                                           torch.cat(latents) if latents else
                                           torch.zeros(0, *first["latent_shape"], dtype=pre.DTYPES[first["dtype"]]),
                                           texts.__getitem__)
                reader.location.write_bytes_atomic(pre.side_file(shard_name), data)
                digests[shard_name] = compact.shard_digest(s)
                total += len(data)
            if next(sources, None) is not None:
                raise MergeError("the merged dataset holds fewer samples than its parts' journals list; merge again.")
            reader.location.write_bytes_atomic(pre.MANIFEST, pre.manifest_bytes(
                first["encoders"], first["checkpoint"], first["dtype"], first["latent_shape"],
                int(reader.index["resolution"]), digests))
        finally:
            opened.clear()
            reader.close()
        return {"carried": True, "shards": len(compact.names), "samples": len(compact), "bytes": total,
                "dtype": first["dtype"], "encoders": first["encoders"], "checkpoint": first["checkpoint"],
                "message": f"precomputed inputs carried: the parts' latents and text encodings ({first['dtype']}, "
                           f"VAE/text encoder of {first['checkpoint']}) re-packed for the {len(compact.names)} "
                           f"merged shard(s) in {self.output / pre.FOLDER}"}

    def not_carried(self) -> dict:
        return {"carried": False, "parts": [str(p) for p in self.at_fault], "command": self.command,
                "message": f"precomputed inputs not carried: {self.reason}. Make them for the merged dataset "
                           f"with `{self.command}`."}


def merge_parts(output: str | Path, parts: list[str | Path], overwrite: bool = False) -> dict:
    """Write the dataset of all parts to `output`; returns its report, plus a `precomputed`
    entry (not in report.json) saying whether the parts' precomputed inputs were carried."""
    output = Path(output)
    infos = check_parts([Path(p) for p in parts])
    _prepare_output(output, [i["folder"] for i in infos], overwrite)
    carry = _PrecomputedCarry(output, infos)
    state = dict(infos[0]["state"])
    identity = state["identity"]
    new_state = {"format": STATE_FORMAT, "fingerprint": record_digest(identity), "identity": identity, "part": None,
                 "complete": None}
    write_json_atomic(output / STATE, new_state)
    journal = Journal(output / JOURNAL)
    writer = DatasetWriter(output, identity["settings"]["shard_size"], journal)
    try:
        for n, info in enumerate(infos):
            for record in journal_records(info["folder"]):
                samples = _shard_samples(info["folder"], record["shard"]["tar"]) if record.get("shard") else iter(())
                if record.get("shard"):
                    carry.start_shard(n, info, record["shard"])
                row = 0
                for person in record["people"]:
                    taken = []
                    for _ in range(person["samples"]):
                        key, sample = next(samples)
                        carry.check(row, key, sample)
                        taken.append(sample)
                        row += 1
                    writer.add(person, taken)
                if next(samples, None) is not None:
                    raise MergeError(f"{info['folder']}: shard {record['shard']['tar']} holds more samples than its "
                                     f"journal line lists; build that part again.")
        writer.close()
    except StopIteration:
        writer.abort()
        raise MergeError("a part's shard holds fewer samples than its journal lists; build that part again.") from None
    except BaseException:
        writer.abort()
        raise
    # index.json's encoder entry as the parts wrote it (they differ at most in the provider)
    face_encoder = {k: v for k, v in infos[0]["index"]["face_encoder"].items() if k != "dim"}
    report = write_dataset_files(output, journal, identity["settings"], face_encoder)
    new_state["complete"] = {"records": journal.count}
    write_json_atomic(output / STATE, new_state)
    # after the dataset is complete: the manifest ties the inputs to the merged index's shard digests
    return {**report, "precomputed": carry.write() if carry.active else carry.not_carried()}
