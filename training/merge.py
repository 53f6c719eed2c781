"""Join the parts of a split build (`python -m training build --part i/N`) into one dataset.

    python -m training merge data/ part0/ part1/ ... [--overwrite]

The parts' samples are copied in people order through the builder's own DatasetWriter,
so keys, shard boundaries, index.json, report.json and the journal are those a single
`build` of the whole source writes. Parts are checked first: one build (same settings and
face encoder, same source listing), every part 0..N-1 exactly once, each finished, no
person in two parts. The output folder is never replaced without `overwrite`.
"""
from __future__ import annotations

import json
import shutil
import tarfile
from pathlib import Path
from typing import Iterator

from .build import (JOURNAL, REPORT, STATE, STATE_FORMAT, DatasetWriter, Journal, _differences, _digest,
                    journal_records, write_dataset_files)
from .shards import INDEX, write_json_atomic


class MergeError(ValueError):
    """Parts that cannot be merged, or an output that is in the way; the message says why and what to do."""


def _part_info(folder: Path) -> dict:
    state_path = folder / STATE
    if not state_path.is_file():
        raise MergeError(f"{folder} is not a dataset part: it has no {STATE}. Give the folders that "
                         f"`python -m training build --part i/N` wrote.")
    state = json.loads(state_path.read_text())
    if not state.get("part"):
        raise MergeError(f"{folder} holds a whole build (made without --part), not a part; it needs no merge.")
    i, n = state["part"]
    complete = state.get("complete")
    count = sum(1 for _ in journal_records(folder))
    if not complete or complete.get("records") != count or not (folder / INDEX).is_file():
        raise MergeError(f"part {i}/{n} in {folder} is not finished: run the same `python -m training build "
                         f"... --part {i}/{n}` into {folder} again to finish it, then merge.")
    return {"folder": folder, "state": state, "part": (int(i), int(n)),
            "index": json.loads((folder / INDEX).read_text())}


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
            what = "; ".join(_differences(first["state"]["identity"], info["state"]["identity"]))
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


def _shard_samples(folder: Path, tar_name: str) -> Iterator[dict]:
    """The samples of one shard in order, members in their written order."""
    sample, key = {}, None
    with tarfile.open(folder / tar_name, "r:") as tar:
        for member in tar:
            k, ext = member.name.split(".", 1)
            if k != key and sample:
                yield sample
                sample = {}
            key = k
            sample[ext] = tar.extractfile(member).read()
    if sample:
        yield sample


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
    output.mkdir(parents=True, exist_ok=True)


def merge_parts(output: str | Path, parts: list[str | Path], overwrite: bool = False) -> dict:
    """Write the dataset of all parts to `output`; returns its report."""
    output = Path(output)
    infos = check_parts([Path(p) for p in parts])
    _prepare_output(output, [i["folder"] for i in infos], overwrite)
    state = dict(infos[0]["state"])
    identity = state["identity"]
    new_state = {"format": STATE_FORMAT, "fingerprint": _digest(identity), "identity": identity, "part": None,
                 "complete": None}
    write_json_atomic(output / STATE, new_state)
    journal = Journal(output / JOURNAL)
    writer = DatasetWriter(output, identity["settings"]["shard_size"], journal)
    try:
        for info in infos:
            for record in journal_records(info["folder"]):
                samples = _shard_samples(info["folder"], record["shard"]["tar"]) if record.get("shard") else iter(())
                for person in record["people"]:
                    taken = [next(samples) for _ in range(person["samples"])]
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
    return report
