"""The dataset builder at scale: thousands of generated people built by one process, by
two worker processes, and as two parts merged; a build killed mid-way and resumed; the
resume refusals; video frame sampling; batched recognition.

Every build here runs the builder's real path (face crops, alignment, masks, captions,
shards, journal, worker processes) with a stand-in face encoder that answers from the
generated pixels (tests/build_standins.py), so 2000 people build in seconds.
"""
from __future__ import annotations

import collections
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from build_standins import ENCODER_FACTORY, make_encoder, make_people, person_image, scale_settings
from training_fixtures import edit_json

PEOPLE = 2000
REPO = Path(__file__).resolve().parent.parent
BUILT = ("index.json", "report.json", "build_state.json", "build_journal.jsonl")


def dataset_files(folder: Path) -> dict[str, bytes]:
    """Every file a build writes, by name."""
    names = list(BUILT) + sorted(p.name for p in folder.glob("shard-*"))
    return {name: (folder / name).read_bytes() for name in names}


def assert_same_dataset(folder: Path, reference: Path) -> None:
    got, want = dataset_files(folder), dataset_files(reference)
    assert sorted(got) == sorted(want)
    for name in want:
        assert got[name] == want[name], f"{folder.name}/{name} differs from the one-process build"


def spec():
    from training.build.settings import EncoderSpec

    return EncoderSpec(ENCODER_FACTORY)


@pytest.fixture(scope="module")
def people(tmp_path_factory) -> Path:
    return make_people(tmp_path_factory.mktemp("scale") / "people", PEOPLE)


@pytest.fixture(scope="module")
def reference(people) -> Path:
    """The one-process build every other way of building must reproduce byte for byte."""
    from training.build.builder import DatasetBuilder

    out = people.parent / "one-process"
    report = DatasetBuilder(people, out, make_encoder(), scale_settings(), progress=False).build()
    # the generated people give every kind of sample and skip
    assert report["people"] == PEOPLE - PEOPLE // 50 and report["samples"] > 1800
    reasons = {s["reason"].split(" (")[0] for s in report["skipped"]}
    assert {"no face found", "corrupt or unreadable image", "no class word in caption"} <= reasons, reasons
    assert report["shards"] > 40 and report["warnings"]
    return out


@pytest.mark.slow  # builds 2000 people: ~40 s for the file on 2 cores
def test_two_worker_processes_build_the_one_process_dataset(people, reference, tmp_path):
    from training.build.builder import DatasetBuilder

    out = tmp_path / "two-workers"
    DatasetBuilder(people, out, spec(), scale_settings(), progress=False, workers=2).build()
    assert_same_dataset(out, reference)


@pytest.mark.slow  # builds 2000 people: ~40 s for the file on 2 cores
def test_two_parts_merge_into_the_one_process_dataset(people, reference, tmp_path):
    from training.build.builder import DatasetBuilder
    from training.build.merge import merge_parts

    parts = [tmp_path / "part0", tmp_path / "part1"]
    reports = [DatasetBuilder(people, parts[i], make_encoder(), scale_settings(), progress=False,
                              part=f"{i}/2").build() for i in range(2)]
    whole = json.loads((reference / "report.json").read_text())
    assert reports[0]["people"] + reports[1]["people"] == whole["people"] and reports[0]["people"] > 900
    out = tmp_path / "merged"
    report = merge_parts(out, [parts[1], parts[0]])  # any order on the command line
    # the parts have no precomputed inputs: the report says so (the rest is report.json's)
    assert report.pop("precomputed") == {
        "carried": False, "parts": [str(parts[0]), str(parts[1])],
        "command": f"python -m training precompute {out} --model SD15.safetensors",
        "message": f"precomputed inputs not carried: none of the parts has precomputed inputs. Make them for the "
                   f"merged dataset with `python -m training precompute {out} --model SD15.safetensors`."}
    assert report == whole
    assert_same_dataset(out, reference)

    # the refusals, each with what to do
    from training.build.merge import MergeError

    with pytest.raises(MergeError, match=r"merged exists and is not empty; merge into a new folder, or pass "
                                         r"--overwrite"):
        merge_parts(out, parts)
    (out / "notes.txt").write_text("mine")
    merge_parts(out, parts, overwrite=True)
    assert_same_dataset(out, reference)
    assert (out / "notes.txt").read_text() == "mine"  # only the dataset's own files are replaced
    with pytest.raises(MergeError, match=r"part\(s\) 1/2 missing: a merge needs all 2 parts \(given: 0/2\)"):
        merge_parts(tmp_path / "m1", [parts[0]])
    with pytest.raises(MergeError, match=r"are both part 0/2"):
        merge_parts(tmp_path / "m2", [parts[0], parts[0], parts[1]])
    other = tmp_path / "other-settings"
    shutil.copytree(parts[1], other)

    def other_settings(state):
        state["identity"]["settings"]["shard_size"] = 41
        state["fingerprint"] = "0123456789abcdef"
    edit_json(other / "build_state.json", other_settings)
    with pytest.raises(MergeError, match=r"built with other settings than .*part0 \(settings.shard_size: 40 "
                                         r"recorded, 41 now \(--shard-size\)"):
        merge_parts(tmp_path / "m3", [parts[0], other])
    unfinished = tmp_path / "unfinished"
    shutil.copytree(parts[1], unfinished)
    edit_json(unfinished / "build_state.json", lambda state: state.update(complete=None))
    with pytest.raises(MergeError, match=r"part 1/2 in .*unfinished is not finished: run the same `python -m "
                                         r"training build \.\.\. --part 1/2`"):
        merge_parts(tmp_path / "m4", [parts[0], unfinished])
    overlapping = tmp_path / "overlapping"
    shutil.copytree(parts[1], overlapping)
    journal = (overlapping / "build_journal.jsonl").read_text().splitlines()
    first = json.loads(journal[0])
    first["people"][0]["name"] = "p00001"  # a person of part 0
    (overlapping / "build_journal.jsonl").write_text("\n".join([json.dumps(first)] + journal[1:]) + "\n")
    with pytest.raises(MergeError, match=r"person 'p00001' is in both .*part0 and .*overlapping: the parts overlap"):
        merge_parts(tmp_path / "m5", [parts[0], overlapping])
    from training.__main__ import main

    assert main(["merge", str(tmp_path / "m6"), str(parts[0])]) == 2  # the command line: message, no traceback
    assert not (tmp_path / "m6" / "index.json").exists()


def _wait_group_gone(group: int, seconds: float) -> bool:
    """Whether processes of the group are still there after up to `seconds`."""
    import time

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return False
        time.sleep(0.2)
    return True


def _log_counts(path: Path) -> collections.Counter:
    return collections.Counter(int(x) for x in path.read_text().split()) if path.is_file() else collections.Counter()


@pytest.mark.slow  # builds 2000 people: ~40 s for the file on 2 cores
def test_a_killed_build_resumes_with_only_the_unfinished_people(people, reference, tmp_path, monkeypatch):
    """Kill a two-worker build (SIGKILL, no cleanup) once a worker reaches person 1200, then
    resume in one process: only people not committed to the journal are analyzed again,
    and the result is the one-process dataset."""
    import training.build.builder as build
    from training.build.journal import journal_records

    out = tmp_path / "killed"
    comfy = Path(next(iter(sys.modules["comfy"].__path__))).parent
    script = (
        "import os, sys\n"
        f"sys.path[:0] = [{str(REPO)!r}, {str(REPO / 'tests')!r}]\n"
        "os.environ['STANDIN_KILL_PID'] = str(os.getpid())\n"
        "from build_standins import scale_settings, ENCODER_FACTORY\n"
        "from training.build.builder import DatasetBuilder\nfrom training.build.settings import EncoderSpec\n"
        f"DatasetBuilder({str(people)!r}, {str(out)!r}, EncoderSpec(ENCODER_FACTORY), scale_settings(),\n"
        "               progress=False, workers=2).build()\n")
    env = {**os.environ, "COMFYUI_PATH": str(comfy), "STANDIN_KILL_AT": "1200",
           "STANDIN_FACE_LOG": str(tmp_path / "killed.log")}
    with open(tmp_path / "killed.out", "wb") as output:
        proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO, start_new_session=True,
                                stdout=output, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=300)
            workers_left = _wait_group_gone(proc.pid, 30)  # the builder's workers stop on their own
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    assert not workers_left, "the killed builder's worker processes kept running"
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "killed.out").read_text()[-3000:]
    assert not (out / "index.json").exists()
    done = {p["name"] for rec in journal_records(out) for p in rec["people"]}
    assert 200 < len(done) < 1200, len(done)  # killed mid-way, with shards committed
    assert _log_counts(tmp_path / "killed.log")[1200] >= 1

    # resume in one process, counting what it opens and analyzes
    scanned = []
    scan = build.scan_person
    monkeypatch.setattr(build, "scan_person", lambda root, name: (scanned.append(name), scan(root, name))[1])
    monkeypatch.setenv("STANDIN_FACE_LOG", str(tmp_path / "resumed.log"))
    monkeypatch.delenv("STANDIN_KILL_AT", raising=False)
    build.DatasetBuilder(people, out, make_encoder(), scale_settings(), progress=False).build()
    names = sorted(p.name for p in people.iterdir())
    assert scanned == [n for n in names if n not in done]  # finished people's folders are not even listed
    expected = collections.Counter()
    for name in scanned:
        expected[int(name[1:])] += len(list((people / name).glob("*.png")))
    assert _log_counts(tmp_path / "resumed.log") == expected  # every unfinished photo once, nothing else
    assert_same_dataset(out, reference)


def test_resume_refusals_name_the_setting_and_the_way_on(tmp_path):
    from training.build.settings import BuildStateError
    from training.build.builder import DatasetBuilder

    src = make_people(tmp_path / "src", 12)
    out = tmp_path / "out"
    DatasetBuilder(src, out, make_encoder(), scale_settings(), progress=False).build()
    with pytest.raises(BuildStateError) as caught:
        DatasetBuilder(src, out, make_encoder(), scale_settings(video_stride=2), progress=False).build()
    text = str(caught.value)
    assert "settings.video_stride: 0 recorded, 2 now (--video-stride)" in text
    assert "Build with the recorded settings and face encoder to continue it, or use a new output folder" in text
    other = make_encoder()
    other.recognizer.dim, other.recognizer.kind = 64, "standin:other64"
    with pytest.raises(BuildStateError, match=r"face_encoder.dim: 32 recorded, 64 now \(--pack/--detector/"
                                              r"--recognizer/--parsing-weights\)"):
        DatasetBuilder(src, out, other, scale_settings(), progress=False).build()
    with pytest.raises(BuildStateError, match=r"holds the whole build \(no --part\), but this build is part 0/2"):
        DatasetBuilder(src, out, make_encoder(), scale_settings(), progress=False, part="0/2").build()
    part = tmp_path / "part"
    DatasetBuilder(src, part, make_encoder(), scale_settings(), progress=False, part="0/2").build()
    (src / "p99999").mkdir()  # the split would move
    with pytest.raises(BuildStateError, match=r"lists other people folders now \(13\) than when part 0/2 was "
                                              r"started .* \(12\)"):
        DatasetBuilder(src, part, make_encoder(), scale_settings(), progress=False, part="0/2").build()
    with pytest.raises(ValueError, match=r"part must look like i/N"):
        DatasetBuilder(src, part, make_encoder(), scale_settings(), progress=False, part="2")
    with pytest.raises(TypeError, match=r"workers > 1 needs the face encoder as an EncoderSpec"):
        DatasetBuilder(src, part, make_encoder(), scale_settings(), progress=False, workers=2)


def test_recognition_is_one_batched_call_per_person(tmp_path):
    from training.build.builder import DatasetBuilder

    src = make_people(tmp_path / "src", 11)  # p00002 has three photos, p00010 two, the others one
    (src / "p00004" / "1.png").write_bytes((src / "p00005" / "0.png").read_bytes())  # and p00004 two
    encoder = make_encoder()
    report = DatasetBuilder(src, tmp_path / "out", encoder, scale_settings(), progress=False).build()
    assert encoder.recognizer.calls == [1, 1, 3, 1, 2, 1, 1, 1, 1, 1, 2]  # one call per person, all its faces
    assert report["people"] == 11 and report["samples"] == 15 - len([s for s in report["skipped"]
                                                                      if "caption" in s["reason"]])


def _write_clip(path: Path, frames: int, fps: float = 6.0) -> None:
    cv2 = pytest.importorskip("cv2")
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (40, 40))
    for n in range(frames):
        image = person_image(7, 0)
        image[1:] = 60
        image[8:30, 9 + n % 3:29 + n % 3] = 250  # flat values survive MJPG
        writer.write(image[:, :, ::-1].copy())
    writer.release()


def _video_metas(src: Path, out: Path, **settings) -> list[dict]:
    from training.build.builder import DatasetBuilder
    from training.dataset.shards import ShardReader

    report = DatasetBuilder(src, out, make_encoder(), scale_settings(**settings), progress=False).build()
    assert not report["skipped"], report["skipped"]
    reader = ShardReader(out)
    return [json.loads(reader.read(i)["json"]) for i in range(len(reader))]


def test_every_video_frame_can_be_a_target_with_a_distant_reference(tmp_path):
    src = tmp_path / "src" / "anna"
    src.mkdir(parents=True)
    _write_clip(src / "clip.avi", 12)
    (src / "clip.txt").write_text("a woman talking")
    metas = _video_metas(tmp_path / "src", tmp_path / "all", video_stride=1)
    frame = lambda name: int(name.rsplit("#frame", 1)[1])  # noqa: E731
    assert [frame(m["source"]) for m in metas] == list(range(12))
    gaps = [abs(frame(m["source"]) - frame(m["reference_source"])) for m in metas]
    assert min(gaps) >= 3  # a quarter of the clip: never the target or a neighbouring frame
    assert len({m["reference_source"] for m in metas}) > 3  # drawn, not one fixed frame
    again = _video_metas(tmp_path / "src", tmp_path / "again", video_stride=1)
    assert again == metas  # the draw is the same on every run
    strided = _video_metas(tmp_path / "src", tmp_path / "stride3", video_stride=3)
    assert [frame(m["source"]) for m in strided] == [0, 3, 6, 9]
    by_fps = _video_metas(tmp_path / "src", tmp_path / "fps2", video_fps=2.0)  # a 6 fps clip: every 3rd frame
    assert by_fps == strided
    ends = _video_metas(tmp_path / "src", tmp_path / "ends")  # the default: the paper's two end frames
    assert [m["source"] for m in ends] == ["anna/clip.avi#target0", "anna/clip.avi#target1"]
    assert {m["reference_source"] for m in ends} == {"anna/clip.avi#middle"}


def test_a_build_started_by_the_previous_version_resumes(tmp_path):
    """build_state.json of the previous format (people_done, shards, skips in one file, an
    identity without the model files and the newer settings) is continued, not redone."""
    from training.build.settings import JOURNAL, STATE
    from training.build.builder import DatasetBuilder
    from training.build.journal import Journal

    src = make_people(tmp_path / "src", 12)
    later = [f"p{i:05d}" for i in range(6, 12)]
    for name in later:  # hidden folders are not people: the first run sees six
        (src / name).rename(src / f".{name}")
    out = tmp_path / "out"
    DatasetBuilder(src, out, make_encoder(), scale_settings(), progress=False).build()
    journal = Journal(out / JOURNAL)
    state = json.loads((out / STATE).read_text())
    for key in ("video_stride", "video_fps", "video_reference_gap", "captions", "captioner"):
        state["identity"]["settings"].pop(key, None)
    old = {"fingerprint": state["fingerprint"], "identity": {k: state["identity"][k] for k in ("settings",
                                                                                               "face_encoder")},
           "shards": journal.shards, "people_done": sorted(journal.done), "skipped": journal.skipped,
           "warnings": journal.warnings, "next_key": journal.samples, "embedding_dim": journal.embedding_dim,
           "subject_words": {w: sorted(s) for w, s in journal.words.items()}}
    (out / STATE).write_text(json.dumps(old))
    (out / JOURNAL).unlink()
    for name in later:
        (src / f".{name}").rename(src / name)
    analyzed = []
    encoder = make_encoder()
    detect = encoder.detect
    encoder.detect = lambda image, threshold: (analyzed.append(int(image[0, 0, 0])), detect(image, threshold))[1]
    report = DatasetBuilder(src, out, encoder, scale_settings(), progress=False).build()
    assert sorted(set(analyzed)) == list(range(6, 12))  # the first six were done by the previous version
    clean = DatasetBuilder(src, tmp_path / "clean", make_encoder(), scale_settings(), progress=False).build()
    assert report == {**clean, "shards": report["shards"]}  # shards closed where the first run stopped
