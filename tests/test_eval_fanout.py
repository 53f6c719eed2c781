"""The evaluation's fan-out (evaluation/fanout.py) against real ComfyUI servers on 127.0.0.1.

Jobs are txt2img graphs of the random SD1.5 stand-in at 64x64, a few steps; every test gives
its prompts a text of its own, so that no server answers a job from ComfyUI's cache of an
earlier test. A CountingClient records, per job key, the submissions a server got (before
ComfyUI's answer) and the images fetched from it (one per image of a successful attempt).
"""
from __future__ import annotations

import json
import os
import re
import signal
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS_DIR, started_server
from PIL import Image

from evaluation.fanout import MANIFEST, FanoutError, ImageJob, file_sha256, run_jobs
from headless.client import ComfyClient
from headless.graphs import txt2img
from headless.server import free_port

ONLY_ON_C = "fanout_only_on_c.safetensors"  # a checkpoint name only server "c" has
SAVE = "7"  # txt2img's SaveImage node
PROGRESS = re.compile(r"^\[fanout\] \d+/\d+ images")


class CountingClient(ComfyClient):
    """A ComfyClient that records which jobs it was asked to run and which images it fetched."""

    def __init__(self, base_url: str, on_submit=None):
        super().__init__(base_url)
        self.attempted: list[str] = []  # job keys, as submitted (rejected or not)
        self.fetched: list[str] = []  # job keys, one per image fetched
        self.uploads: list[str] = []
        self.on_submit = on_submit

    def submit(self, graph: dict) -> str:
        self.attempted.append(graph[SAVE]["inputs"]["filename_prefix"].split("/", 1)[1])
        prompt_id = super().submit(graph)
        if self.on_submit is not None:
            self.on_submit(self)
        return prompt_id

    def fetch(self, file: dict) -> bytes:
        data = super().fetch(file)
        self.fetched.append(file["filename"].rsplit("_", 2)[0])  # "<key>_00001_.png"
        return data

    def upload_image(self, path, name=None, **kwargs) -> str:
        self.uploads.append(name)
        return super().upload_image(path, name=name, **kwargs)


def make_jobs(images_dir: Path, tag: str, n: int, checkpoint: str, batch=lambda k: 1, seed=lambda k: 100 + k,
              uploads: dict | None = None, steps: int = 4) -> list[ImageJob]:
    """n txt2img jobs "<tag>NN", each writing images_dir/people/<key>_<i>.png (i: its batch index)."""
    jobs = []
    for k in range(n):
        key, size = f"{tag}{k:02d}", batch(k)
        text = f"fanout test {tag}, image {k}"
        graph = txt2img(checkpoint, text, width=64, height=64, steps=steps, seed=seed(k), batch_size=size,
                        prefix=f"fanout/{key}")
        files = tuple(images_dir / "people" / f"{key}_{i}.png" for i in range(size))
        records = tuple({"prompt": text, "category": "test", "prompt_id": key, "seed": seed(k), "batch_index": i}
                        for i in range(size))
        jobs.append(ImageJob(key, graph, SAVE, images_dir, files, records, uploads or {}))
    return jobs


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def manifest(images_dir: Path) -> dict:
    return json.loads((images_dir / MANIFEST).read_text())


def pngs(images_dir: Path) -> list[str]:
    """Every file under images_dir but the manifest (temp files of a botched write included)."""
    return sorted(p.relative_to(images_dir).as_posix() for p in images_dir.rglob("*")
                  if p.is_file() and p.name != MANIFEST)


@pytest.fixture(scope="module")
def servers(tmp_path_factory, sd15_checkpoint):
    """Three ComfyUI servers on the session's models, started side by side; "c" also sees ONLY_ON_C."""
    only_c = tmp_path_factory.mktemp("fanout-only-c")
    (only_c / ONLY_ON_C).symlink_to(MODELS_DIR / "checkpoints" / sd15_checkpoint)
    extra = {"a": {}, "b": {}, "c": {"extra_model_paths": {"checkpoints": str(only_c)}}}
    with ThreadPoolExecutor(3) as pool:
        futures = {name: pool.submit(started_server, tmp_path_factory.mktemp(f"fanout-{name}"), **kw)
                   for name, kw in extra.items()}
    started, errors = {}, []
    for name, future in futures.items():
        try:
            started[name] = future.result()
        except BaseException as exc:  # noqa: BLE001 - pytest.fail's Failed included; re-raised below
            errors.append(exc)
    if errors:
        for server in started.values():
            server.stop()
        raise errors[0]
    yield started
    for server in started.values():
        server.stop()


def test_jobs_that_would_collide_are_refused_before_any_work(tmp_path):
    unreachable = [ComfyClient(f"http://127.0.0.1:{free_port()}")]
    jobs = make_jobs(tmp_path / "images", "v", 2, "any.safetensors")
    same_key = [jobs[0], ImageJob(jobs[0].key, jobs[1].graph, SAVE, jobs[1].images_dir, jobs[1].files, jobs[1].records)]
    with pytest.raises(ValueError, match="two jobs have the key 'v00'"):
        run_jobs(same_key, unreachable, log=lambda line: None)
    same_file = [jobs[0], ImageJob("other", jobs[1].graph, SAVE, jobs[1].images_dir, jobs[0].files, jobs[1].records)]
    with pytest.raises(ValueError, match=r"jobs 'v00' and 'other' both write .*v00_0\.png"):
        run_jobs(same_file, unreachable, log=lambda line: None)
    outside = [ImageJob("out", jobs[0].graph, SAVE, tmp_path / "images", (tmp_path / "elsewhere.png",),
                        jobs[0].records)]
    with pytest.raises(ValueError, match="is not under its images folder"):
        run_jobs(outside, unreachable, log=lambda line: None)
    reserved = [ImageJob("r", jobs[0].graph, SAVE, jobs[0].images_dir, jobs[0].files, ({"sha256": "x"},))]
    with pytest.raises(ValueError, match="sha256"):
        run_jobs(reserved, unreachable, log=lambda line: None)
    with pytest.raises(ValueError, match="given more than once"):
        run_jobs(jobs, unreachable * 2, log=lambda line: None)
    assert not (tmp_path / "images").exists()


def test_a_run_whose_servers_are_all_gone_says_how_much_is_done_and_that_a_rerun_resumes(tmp_path):
    clients = [ComfyClient(f"http://127.0.0.1:{free_port()}") for _ in range(2)]
    lines: list[str] = []
    with pytest.raises(FanoutError, match=r"every ComfyUI server is gone .*0 of 3 image\(s\) are done.*re-run") as err:
        run_jobs(make_jobs(tmp_path / "images", "gone", 3, "any.safetensors"), clients, log=lines.append)
    assert all(s.retired for s in err.value.stats.servers.values())
    assert all(any(c.base_url in line and "retired" in line for line in lines) for c in clients)


@pytest.mark.slow  # three servers start (~20 s, for the module's tests), then 14 jobs
def test_two_servers_make_the_same_images_and_manifest_as_one(servers, sd15_checkpoint, tmp_path):
    photo = tmp_path / "ref.png"
    Image.fromarray(np.full((8, 8, 3), 90, np.uint8)).save(photo)
    uploads = {"fanout_ref.png": photo}  # not in the graph: shows each server gets it once

    def jobs(images_dir):
        return make_jobs(images_dir, "same", 6, sd15_checkpoint, batch=lambda k: 2 if k % 3 == 0 else 1,
                         uploads=uploads)

    one, two = tmp_path / "one" / "images", tmp_path / "two" / "images"
    alone = CountingClient(servers["a"].url)
    stats_one = run_jobs(jobs(one), [alone], log=lambda line: None)
    pair = [CountingClient(servers["b"].url), CountingClient(servers["c"].url)]
    lines: list[str] = []
    stats_two = run_jobs(jobs(two), pair, log=lines.append)

    assert stats_one.generated_images == stats_two.generated_images == 8
    assert all(s.images >= 1 for s in stats_two.servers.values()), "both servers must have taken jobs"
    assert sorted(alone.fetched) == sorted(pair[0].fetched + pair[1].fetched)  # each image fetched once
    assert alone.uploads == pair[0].uploads == pair[1].uploads == ["fanout_ref.png"]
    names = pngs(one)
    assert names == pngs(two) == sorted(str(f.relative_to(one)) for job in jobs(one) for f in job.files)
    for name in names:
        assert np.array_equal(pixels(one / name), pixels(two / name)), name
        with Image.open(two / name) as im:
            assert im.mode == "RGB" and im.size == (64, 64)
            assert not {"prompt", "workflow"} & set(im.info), "ComfyUI's embedded workflow must be dropped"
    # Different jobs and batch indices really are different images: a mix-up would show.
    assert len({pixels(one / name).tobytes() for name in names}) == len(names)

    m_one, m_two = manifest(one), manifest(two)
    assert {e["server"] for e in m_one.values()} == {servers["a"].url}
    assert {e["server"] for e in m_two.values()} == {servers["b"].url, servers["c"].url}
    strip = lambda m: {k: {f: v for f, v in e.items() if f not in ("server", "seconds")} for k, e in m.items()}
    assert strip(m_one) == strip(m_two)
    assert m_two["people/same00_1.png"]["batch_index"] == 1 and m_two["people/same00_1.png"]["seed"] == 100
    assert all(e["sha256"] == file_sha256(two / k) for k, e in m_two.items())
    assert sum(bool(PROGRESS.match(line)) for line in lines) == 6
    assert any("s/image" in line and "to go" in line for line in lines)


@pytest.mark.slow  # a server of its own to kill: ~25 s
def test_a_server_killed_mid_run_leaves_its_work_to_the_others_without_duplicates(
        servers, start_server, sd15_checkpoint, tmp_path):
    victim = start_server()
    for server in (victim, servers["a"]):  # both warm (model loaded): the victim surely gets a second job
        server.client.run(txt2img(sd15_checkpoint, "fanout test warm-up", width=64, height=64, steps=1), timeout=300)

    def kill_on_second_job(client: CountingClient) -> None:
        if len(client.attempted) == 2:  # its first image is saved; this one is queued or running
            os.killpg(os.getpgid(victim.proc.pid), signal.SIGKILL)
            victim.proc.wait(10)

    doomed = CountingClient(victim.url, on_submit=kill_on_second_job)
    survivor = CountingClient(servers["a"].url)
    images = tmp_path / "images"
    jobs = make_jobs(images, "kill", 10, sd15_checkpoint)
    lines: list[str] = []
    stats = run_jobs(jobs, [doomed, survivor], log=lines.append)

    assert len(doomed.attempted) == 2 and victim.proc.returncode is not None, "the server must have been killed"
    assert stats.servers[victim.url].retired and stats.retried >= 1
    assert any(victim.url in line and "retired" in line for line in lines)
    lost = doomed.attempted[1]
    assert lost in survivor.fetched and lost not in doomed.fetched
    assert Counter(doomed.fetched + survivor.fetched) == Counter(j.key for j in jobs), "each image fetched once"
    assert pngs(images) == sorted(f"people/{j.key}_0.png" for j in jobs)
    entries = manifest(images)
    assert set(entries) == set(pngs(images))
    assert all(e["sha256"] == file_sha256(images / k) for k, e in entries.items())
    assert entries[f"people/{doomed.fetched[0]}_0.png"]["server"] == victim.url
    assert entries[f"people/{lost}_0.png"]["server"] == servers["a"].url
    assert stats.generated_images == 10 and stats.servers[victim.url].images == 1


class Interrupted(Exception):
    pass


@pytest.mark.slow
def test_a_resumed_run_generates_only_what_is_not_complete_on_disk(servers, sd15_checkpoint, tmp_path):
    images = tmp_path / "images"
    jobs = make_jobs(images, "resume", 6, sd15_checkpoint)
    finished: list[str] = []

    def interrupt_after_four(line: str) -> None:
        if PROGRESS.match(line):
            finished.append(line)
            if len(finished) == 4:
                raise Interrupted()

    with pytest.raises(Interrupted):
        run_jobs(jobs, [servers["a"].client], log=interrupt_after_four)
    assert pngs(images) == [f"people/resume{k:02d}_0.png" for k in range(4)]
    first = {k: pixels(images / f"people/resume{k:02d}_0.png") for k in range(4)}

    # 00: other pixels under its name; 01: the job now wants another seed; 02: its entry is lost.
    Image.fromarray(255 - first[0]).save(images / "people/resume00_0.png")
    entries = manifest(images)
    del entries["people/resume02_0.png"]
    (images / MANIFEST).write_text(json.dumps(entries))
    kept = (images / "people/resume03_0.png").stat().st_mtime_ns
    jobs = make_jobs(images, "resume", 6, sd15_checkpoint, seed=lambda k: 7 if k == 1 else 100 + k)

    client = CountingClient(servers["a"].url)
    lines: list[str] = []
    stats = run_jobs(jobs, [client], log=lines.append)
    assert sorted(client.attempted) == ["resume00", "resume01", "resume02", "resume04", "resume05"]
    assert (stats.skipped, stats.generated) == (1, 5)
    assert any("resume00" in line and "sha256" in line for line in lines)
    assert any("resume01" in line and "seed=101" in line and "seed=7" in line for line in lines)
    assert (images / "people/resume03_0.png").stat().st_mtime_ns == kept
    assert np.array_equal(pixels(images / "people/resume00_0.png"), first[0])
    assert not np.array_equal(pixels(images / "people/resume01_0.png"), first[1])
    entries = manifest(images)
    assert entries["people/resume01_0.png"]["seed"] == 7
    assert all(e["sha256"] == file_sha256(images / k) for k, e in entries.items()) and len(entries) == 6

    again = CountingClient(servers["a"].url)
    stats = run_jobs(jobs, [again], log=lambda line: None)
    assert again.attempted == [] and (stats.skipped, stats.generated) == (6, 0)


@pytest.mark.slow
def test_a_job_failing_on_one_server_runs_on_another_and_one_failing_everywhere_stops_the_run(
        servers, sd15_checkpoint, tmp_path):
    a, c = CountingClient(servers["a"].url), CountingClient(servers["c"].url)
    images = tmp_path / "images"
    jobs = make_jobs(images, "onlyc", 3, ONLY_ON_C)
    lines: list[str] = []
    stats = run_jobs(jobs, [a, c], log=lines.append)
    assert a.attempted and not a.fetched, "server a was tried and failed"
    assert sorted(c.fetched) == [j.key for j in jobs]
    assert stats.servers[a.base_url].failures == len(set(a.attempted)) and stats.retried >= 1
    assert any(f"failed on {a.base_url}" in line and ONLY_ON_C in line for line in lines)
    assert {e["server"] for e in manifest(images).values()} == {c.base_url}

    missing = "fanout_on_no_server.safetensors"
    jobs = make_jobs(images, "nowhere", 1, missing) + make_jobs(images, "fine", 2, sd15_checkpoint)
    with pytest.raises(FanoutError) as err:
        run_jobs(jobs, [CountingClient(a.base_url), CountingClient(c.base_url)], log=lambda line: None)
    message = str(err.value)
    assert message.startswith("job 'nowhere00' failed on every server it could run on")
    assert a.base_url in message and c.base_url in message and message.count(missing) >= 2
    assert "re-run" in message
