"""Fan image jobs out over several ComfyUI servers through their HTTP API.

One queue of jobs (one ComfyUI graph each, its SaveImage node writing one or more images)
and one worker thread per server, which takes the next job, uploads the photos it needs
(once per server), submits the graph, waits for it, fetches its images and saves them.

On disk, per images folder: the PNGs (re-encoded as RGB, without the workflow ComfyUI embeds)
and the manifest images/prompts.json, {"<subfolder>/<file>.png": {<the job's record>,
"sha256": <of the saved file>, "server": <URL>, "seconds": <generation time per image>}}, the layout evaluation.score reads.
A job is complete when each of its files is on disk, its manifest entry holds the job's
record and the file's bytes match the entry's sha256; complete jobs are skipped, so a run
that stopped resumes where it was, and anything else is generated again.

Failures: a server that cannot be reached (or does not finish a job in time) is retired and
its job goes back to the queue; a job that fails on a server (ComfyUI rejected or failed the
graph) is tried on another server that has not failed it. Files are written only after every
image of a job has been fetched, by the one attempt that succeeded: no duplicates, and an
interrupted job leaves either its complete old state or its complete new files.
"""
from __future__ import annotations

import contextlib
import hashlib
import http.client
import io
import json
import os
import threading
import time
import urllib.error
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from headless.client import ComfyClient, ComfyError, RunResult
from portraitbooth_core.atomic_files import write_bytes_atomic

MANIFEST = "prompts.json"  # the name evaluation.score reads
RESERVED = ("sha256", "server", "seconds")  # manifest fields this module writes beside a job's record


class FanoutError(RuntimeError):
    """The run stopped: a job failed on every server it could run on, or no server is left.
    `stats` holds what was done up to then (kept on disk: a new run resumes from it)."""

    def __init__(self, message: str, stats: FanoutStats | None = None):
        super().__init__(message)
        self.stats = stats


@dataclass(frozen=True)
class ImageJob:
    """One graph to run on some server, and where its images go.

    key: unique and stable across runs (e.g. "fastcomposer/obama/accessory03"), for logs and errors.
    graph: a ComfyUI API graph, ready to submit. save_node: the id of its SaveImage node.
    images_dir: the folder whose prompts.json records the files. files: the PNGs under
    images_dir, in batch order. records: each file's manifest entry (JSON values; not
    "sha256" or "server"). uploads: server-side image name -> local photo, uploaded to a
    server once, before its first job that needs it.
    """

    key: str
    graph: dict
    save_node: str
    images_dir: Path
    files: tuple[Path, ...]
    records: tuple[dict, ...]
    uploads: Mapping[str, Path] = field(default_factory=dict)


@dataclass
class ServerStats:
    url: str
    images: int = 0
    jobs: int = 0
    seconds: float = 0.0  # spent on its successful jobs, upload to saved files
    failures: int = 0  # jobs that failed on it (tried elsewhere)
    retired: str | None = None  # why it was taken out of the run (unreachable, timed out)

    @property
    def seconds_per_image(self) -> float | None:
        return self.seconds / self.images if self.images else None


@dataclass
class FanoutStats:
    servers: dict[str, ServerStats]  # by URL, in the order the clients were given
    jobs: int = 0
    total_images: int = 0
    skipped: int = 0  # jobs complete on disk before the run
    skipped_images: int = 0
    generated: int = 0  # jobs generated in this run
    generated_images: int = 0
    retried: int = 0  # attempts that went back to the queue (failed job or lost server)
    wall: float = 0.0  # seconds from the workers' start to the end of the run

    @property
    def images_per_second(self) -> float | None:
        return self.generated_images / self.wall if self.generated_images and self.wall > 0 else None

    @property
    def done_images(self) -> int:
        return self.skipped_images + self.generated_images


# -- PNG files ---------------------------------------------------------------------------------
def encode_png(data: bytes) -> bytes:
    """PNG bytes of the image in `data`, as RGB and without metadata: ComfyUI embeds the whole
    workflow in every PNG it saves, which the evaluation images do not need to carry."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        rgb = im.convert("RGB")
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())  # a new image: no info dict, no text chunks
    out = io.BytesIO()
    clean.save(out, format="PNG")
    return out.getvalue()


def save_png(data: bytes, path: str | os.PathLike) -> str:
    """Save the image in `data` to `path` as encode_png makes it, atomically; returns the
    sha256 of the file's bytes."""
    png = encode_png(data)
    write_bytes_atomic(path, png)
    return hashlib.sha256(png).hexdigest()


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# -- validation --------------------------------------------------------------------------------
def _rel(job: ImageJob, file: Path) -> str:
    """The file's manifest key: its path under the job's images folder."""
    base, target = Path(os.path.abspath(job.images_dir)), Path(os.path.abspath(file))
    try:
        return target.relative_to(base).as_posix()
    except ValueError:
        raise ValueError(f"job {job.key!r}: its file {file} is not under its images folder {job.images_dir}; "
                         "give files inside images_dir") from None


def _json_record(job: ImageJob, record: dict) -> dict:
    """The record as it reads back from the manifest (tuples become lists), so that
    comparing it with a manifest entry compares like with like."""
    if not isinstance(record, dict):
        raise TypeError(f"job {job.key!r}: a record must be a dict, not {type(record).__name__}")
    clash = [k for k in RESERVED if k in record]
    if clash:
        raise ValueError(f"job {job.key!r}: its record has {clash}, which the fan-out writes itself; "
                         "rename those fields")
    try:
        return json.loads(json.dumps(record))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"job {job.key!r}: its record {record!r} is not JSON ({exc}); use plain values") from None


def check_jobs(jobs: Sequence[ImageJob], clients: Sequence[ComfyClient]) -> list[tuple[dict, ...]]:
    """Raise ValueError (TypeError for a record that is no dict, FileNotFoundError for a missing
    photo) on a job list that cannot run as given, before any work; returns each job's records as JSON reads them back."""
    if not clients:
        raise ValueError("no ComfyUI server to run the jobs on; give at least one")
    urls = [c.base_url for c in clients]
    repeated = sorted({u for u in urls if urls.count(u) > 1})
    if repeated:
        raise ValueError(f"server {repeated[0]} is given more than once; give each server once")
    keys: set[str] = set()
    writers: dict[str, str] = {}  # absolute file path -> key of the job that writes it
    uploads: dict[str, tuple[Path, str]] = {}  # server-side name -> (photo, key of the first job naming it)
    records = []
    for job in jobs:
        if not isinstance(job.key, str) or not job.key:
            raise ValueError(f"a job has the key {job.key!r}; give every job a non-empty string key")
        if job.key in keys:
            raise ValueError(f"two jobs have the key {job.key!r}; keys must be unique")
        keys.add(job.key)
        if job.save_node not in job.graph:
            raise ValueError(f"job {job.key!r}: its save_node {job.save_node!r} is not a node of its graph")
        if not job.files or len(job.files) != len(job.records):
            raise ValueError(f"job {job.key!r}: {len(job.files)} file(s) and {len(job.records)} record(s); "
                             "give one record per file, and at least one file")
        for file in job.files:
            if Path(file).suffix.lower() != ".png":
                raise ValueError(f"job {job.key!r}: {file} is not a .png name; the fan-out saves PNGs")
            _rel(job, file)
            path = os.path.abspath(file)
            if path in writers:
                raise ValueError(f"jobs {writers[path]!r} and {job.key!r} both write {file}; "
                                 "give every image its own file")
            writers[path] = job.key
        for name, photo in job.uploads.items():
            photo = Path(photo)
            if name in uploads and os.path.abspath(uploads[name][0]) != os.path.abspath(photo):
                raise ValueError(f"jobs {uploads[name][1]!r} and {job.key!r} upload different photos under one "
                                 f"name {name!r} ({uploads[name][0]} and {photo}); give each photo its own name")
            if not photo.is_file():
                raise FileNotFoundError(f"job {job.key!r}: the photo {photo} to upload as {name!r} does not exist")
            uploads.setdefault(name, (photo, job.key))
        records.append(tuple(_json_record(job, r) for r in job.records))
    return records


# -- the manifests -----------------------------------------------------------------------------
class _Manifests:
    """Every images folder's prompts.json, read once and written whole (atomically, one
    writer at a time) after each finished job."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.data: dict[Path, dict] = {}

    def of(self, images_dir: Path) -> dict:
        folder = Path(os.path.abspath(images_dir))
        if folder not in self.data:
            path = folder / MANIFEST
            data = {}
            if path.is_file():
                try:
                    data = json.loads(path.read_text())
                except ValueError as exc:
                    raise ValueError(f"the manifest {path} is not JSON ({exc}); delete it to generate that folder's "
                                     "images again") from None
                if not isinstance(data, dict):
                    raise ValueError(f"the manifest {path} is not a JSON object; delete it to generate that folder's "
                                     "images again")
            self.data[folder] = data
        return self.data[folder]

    def incomplete(self, job: ImageJob, records: tuple[dict, ...]) -> str | None:
        """Why `job` must run: its first file that is missing, unrecorded, recorded differently
        or changed since it was written; None when the job is complete on disk."""
        manifest = self.of(job.images_dir)
        for file, record in zip(job.files, records):
            rel = _rel(job, file)
            entry = manifest.get(rel)
            if not Path(file).is_file():
                return f"{rel} is not on disk"
            if not isinstance(entry, dict):
                return f"{rel} is not in {MANIFEST}"
            changed = [k for k in record if entry.get(k) != record[k]]
            if changed:
                k = changed[0]
                return f"{rel} was made with {k}={entry.get(k)!r}, the job has {k}={record[k]!r}"
            if entry.get("sha256") != file_sha256(Path(file)):
                return f"{rel}'s bytes differ from the sha256 in {MANIFEST}"
        return None

    def record(self, job: ImageJob, entries: dict[str, dict]) -> None:
        with self.lock:
            manifest = self.of(job.images_dir)
            manifest.update(entries)
            path = Path(os.path.abspath(job.images_dir)) / MANIFEST
            write_bytes_atomic(path, json.dumps(manifest, indent=1, sort_keys=True).encode())


# -- the run -----------------------------------------------------------------------------------
class _Abort(Exception):
    """Raised inside a worker when the run is being stopped: drop the job, take no other."""


class _JobError(RuntimeError):
    """The job failed on this server (its answer was unusable); other servers may do better."""


def _server_down(exc: BaseException) -> bool:
    """Whether `exc` (raised by an HTTP call to a server) means the server cannot be used:
    refused or dropped connections, socket time-outs, a job past its time limit. An HTTP error
    status is the server answering, not a lost server."""
    if isinstance(exc, (urllib.error.HTTPError, ComfyError, _JobError)):
        return False
    return isinstance(exc, (OSError, http.client.HTTPException))  # URLError, ConnectionError, TimeoutError


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@dataclass
class _Server:
    client: ComfyClient
    stats: ServerStats
    uploaded: set[str] = field(default_factory=set)


class _Run:
    def __init__(self, jobs: Sequence[ImageJob], records: list[tuple[dict, ...]], clients: Sequence[ComfyClient],
                 log: Callable[[str], object], timeout: float, poll: float):
        self.jobs, self.records, self.log_fn = list(jobs), records, log
        self.timeout, self.poll = timeout, poll
        self.servers = [_Server(c, ServerStats(c.base_url)) for c in clients]
        self.stats = FanoutStats({s.stats.url: s.stats for s in self.servers}, jobs=len(self.jobs),
                                 total_images=sum(len(j.files) for j in self.jobs))
        self.manifests = _Manifests()
        self.cond = threading.Condition()
        self.log_lock = threading.Lock()
        self.pending: deque[int] = deque()  # indices into jobs
        self.in_flight = 0
        self.live = {s.stats.url for s in self.servers}
        self.failed_on: dict[int, dict[str, str]] = {}  # job -> {server URL: its error}
        self.error: BaseException | None = None  # what stops the run, raised by run()
        self.draining = False  # finish the jobs being generated, start no other
        self.abort = threading.Event()  # drop the jobs being generated as well
        self.started = 0.0

    # -- logging from any thread ------------------------------------------------------
    def say(self, message: str) -> None:
        with self.log_lock:
            self.log_fn(message)

    def safe_say(self, message: str) -> None:
        """say() from a worker: a log callback that raises stops the run with its exception."""
        try:
            self.say(message)
        except BaseException as exc:  # noqa: BLE001 - re-raised by run() in the caller's thread
            self.stop(exc, abort=True)

    def stop(self, error: BaseException, abort: bool) -> None:
        with self.cond:
            if self.error is None:
                self.error = error
            self.draining = True
            if abort:
                self.abort.set()
            self.cond.notify_all()

    # -- the run ----------------------------------------------------------------------
    def run(self) -> FanoutStats:
        for index, (job, records) in enumerate(zip(self.jobs, self.records)):
            reason = self.manifests.incomplete(job, records)
            if reason is None:
                self.stats.skipped += 1
                self.stats.skipped_images += len(job.files)
                continue
            if any(Path(f).exists() for f in job.files):  # say why files on disk are not kept
                self.say(f"[fanout] {job.key}: generated again, {reason}")
            self.pending.append(index)
        if self.stats.skipped:
            self.say(f"[fanout] {self.stats.skipped} of {len(self.jobs)} job(s) ({self.stats.skipped_images} "
                     f"image(s)) already on disk and in the manifest: not generated again")
        if not self.pending:
            return self.stats
        self.say(f"[fanout] {len(self.pending)} job(s), "
                 f"{self.stats.total_images - self.stats.skipped_images} image(s) to generate on "
                 f"{len(self.servers)} server(s): {', '.join(s.stats.url for s in self.servers)}")
        self.started = time.monotonic()
        threads = [threading.Thread(target=self.worker, args=(s,), name=f"fanout {s.stats.url}", daemon=True)
                   for s in self.servers]
        for t in threads:
            t.start()
        try:
            for t in threads:
                while t.is_alive():
                    t.join(0.2)  # a short wait, so that Ctrl-C reaches this thread
        except BaseException as exc:  # KeyboardInterrupt: cancel what the servers are doing, then stop
            self.stop(exc, abort=True)
            for t in threads:
                t.join(30)
            raise
        finally:
            self.stats.wall = time.monotonic() - self.started
        if self.error is not None:
            if isinstance(self.error, FanoutError):
                self.error.stats = self.stats
            raise self.error
        left = len(self.jobs) - self.stats.skipped - self.stats.generated
        if left:  # every worker ended with work left: a bug, never silent
            raise FanoutError(f"the fan-out ended with {left} job(s) not done", self.stats)
        self.say(self.summary())
        return self.stats

    def summary(self) -> str:
        s = self.stats
        rate = s.images_per_second
        parts = [f"[fanout] done: {s.done_images}/{s.total_images} image(s); {s.generated_images} generated in "
                 f"{_duration(s.wall)}" + (f" ({rate:.2f} images/s)" if rate else "")
                 + (f", {s.skipped_images} already on disk" if s.skipped_images else "")
                 + (f", {s.retried} attempt(s) retried" if s.retried else "")]
        for server in self.servers:
            st = server.stats
            spi = st.seconds_per_image
            parts.append(f"{st.url}: {st.images} image(s)" + (f", {spi:.2f} s/image" if spi else "")
                         + (f", retired ({st.retired})" if st.retired else ""))
        return "; ".join(parts)

    # -- a worker: one per server -----------------------------------------------------
    def worker(self, server: _Server) -> None:
        try:
            while True:
                index = self.claim(server)
                if index is None:
                    return
                job = self.jobs[index]
                began = time.monotonic()
                try:
                    images = self.attempt(server, job)
                except _Abort:
                    with self.cond:
                        self.in_flight -= 1
                        self.cond.notify_all()
                    return
                except Exception as exc:  # noqa: BLE001 - sorted into a lost server or a failed job
                    if _server_down(exc):
                        self.retire(server, index, exc)
                        return
                    self.job_failed(server, index, exc)
                    continue
                self.finish(server, index, images, time.monotonic() - began)
        except BaseException as exc:  # noqa: BLE001 - a local error (disk, log callback): the run stops with it
            self.stop(exc, abort=True)

    def claim(self, server: _Server) -> int | None:
        """The next job this server has not failed; None when the run is over for it."""
        url = server.stats.url
        with self.cond:
            while True:
                if self.draining or url not in self.live:
                    return None
                for index in self.pending:
                    if url not in self.failed_on.get(index, {}):
                        self.pending.remove(index)
                        self.in_flight += 1
                        return index
                if not self.pending and not self.in_flight:
                    return None
                self.cond.wait()  # the jobs left are others' or failed here: one may come back

    def attempt(self, server: _Server, job: ImageJob) -> list[bytes]:
        """Run `job` on `server`: the PNG bytes to save, in batch order. Raises what the server
        did (see _server_down), ComfyError/_JobError for a failed job, _Abort when stopping."""
        client = server.client
        for name, photo in job.uploads.items():
            if name not in server.uploaded:
                stored = client.upload_image(photo, name=name)
                if stored != name:
                    raise _JobError(f"the server stored {photo} as {stored!r}, not as {name!r} as the graph names it")
                server.uploaded.add(name)
        result = self.wait(client, client.submit(job.graph))
        found = result.images(job.save_node)
        if len(found) != len(job.files):
            raise _JobError(f"node {job.save_node} returned {len(found)} image(s), the job expects {len(job.files)}")
        fetched = [client.fetch(record) for record in found]
        try:
            return [encode_png(data) for data in fetched]
        except Exception as exc:  # PIL's UnidentifiedImageError is an OSError: not a lost server
            raise _JobError(f"an image it returned is not readable: {type(exc).__name__}: {exc}") from exc

    def wait(self, client: ComfyClient, prompt_id: str) -> RunResult:
        """ComfyClient.wait, except that it stops (and cancels the prompt) when the run aborts."""
        deadline = time.monotonic() + self.timeout
        while True:
            if self.abort.is_set():
                self.cancel(client, prompt_id)
                raise _Abort()
            result = client.result(prompt_id)
            if result is not None:
                return result
            if time.monotonic() > deadline:
                self.cancel(client, prompt_id)
                raise TimeoutError(f"the job did not finish within {self.timeout:.0f} s")
            self.abort.wait(self.poll)

    @staticmethod
    def cancel(client: ComfyClient, prompt_id: str) -> None:
        """Take the prompt off the server's queue, or interrupt it if it runs (only it: the server
        may be shared); best effort, the server may be gone."""
        for path, payload in (("/queue", {"delete": [prompt_id]}), ("/interrupt", {"prompt_id": prompt_id})):
            with contextlib.suppress(Exception):  # nothing more to do for a server that does not answer
                client.post_json(path, payload)

    # -- outcomes ---------------------------------------------------------------------
    def finish(self, server: _Server, index: int, images: list[bytes], seconds: float) -> None:
        job, url = self.jobs[index], server.stats.url
        entries = {}
        for file, record, png in zip(job.files, self.records[index], images):
            write_bytes_atomic(file, png)
            entries[_rel(job, file)] = {**record, "sha256": hashlib.sha256(png).hexdigest(), "server": url,
                                        "seconds": round(seconds / len(images), 3)}  # its share of the job's time
        self.manifests.record(job, entries)  # after the files: an entry always describes a file on disk
        with self.cond:
            st = server.stats
            st.images += len(images)
            st.jobs += 1
            st.seconds += seconds
            self.stats.generated += 1
            self.stats.generated_images += len(images)
            self.in_flight -= 1
            self.cond.notify_all()
            done, total = self.stats.done_images, self.stats.total_images
            elapsed = time.monotonic() - self.started
            rate = self.stats.generated_images / elapsed if elapsed > 0 else 0.0
            eta = (total - done) / rate if rate else 0.0
            # With one shared queue every server finishes at the total ETA; what is its own is its
            # rate and its expected share of the images left.
            share = (total - done) * (1 / st.seconds_per_image) / rate if rate and st.seconds_per_image else 0.0
            line = (f"[fanout] {done}/{total} images, about {_duration(eta)} to go ({rate:.2f} images/s on "
                    f"{len(self.live)} server(s)) | {job.key}: {len(images)} image(s) in {seconds:.1f} s on {url} "
                    f"({st.seconds_per_image:.2f} s/image there, {st.images} image(s) done, about "
                    f"{min(share, total - done):.0f} of the rest to do)")
        self.say(line)  # a callback that raises stops the run (worker's except): the job is saved by then

    def retire(self, server: _Server, index: int, exc: BaseException) -> None:
        url = server.stats.url
        with self.cond:
            server.stats.retired = f"{type(exc).__name__}: {exc}"
            self.live.discard(url)
            self.in_flight -= 1
            self.pending.appendleft(index)
            self.stats.retried += 1
            left = len(self.live)
            self.check_stuck()
            self.cond.notify_all()
        self.safe_say(f"[fanout] server {url} is not usable ({type(exc).__name__}: {exc}): retired; "
                      f"{self.jobs[index].key} goes back to the queue; {left} server(s) left")

    def job_failed(self, server: _Server, index: int, exc: BaseException) -> None:
        url, job = server.stats.url, self.jobs[index]
        message = f"{type(exc).__name__}: {exc}" if not isinstance(exc, (ComfyError, _JobError)) else str(exc)
        with self.cond:
            server.stats.failures += 1
            self.failed_on.setdefault(index, {})[url] = message
            self.in_flight -= 1
            self.pending.appendleft(index)
            self.stats.retried += 1
            self.check_stuck()
            self.cond.notify_all()
        self.safe_say(f"[fanout] {job.key} failed on {url}: {message}; tried on another server")

    def check_stuck(self) -> None:
        """Under self.cond: stop the run when no server is left, or a queued job has failed on
        every server still in the run."""
        if self.error is not None:
            return
        if not self.live:
            lost = "; ".join(f"{s.stats.url}: {s.stats.retired}" for s in self.servers if s.stats.retired)
            self.error = FanoutError(
                f"every ComfyUI server is gone ({lost}). {self.stats.done_images} of {self.stats.total_images} "
                f"image(s) are done and saved; start the servers again (or give others) and re-run: the run "
                "resumes, generating only what is missing.")
            self.draining = True
            return
        for index in self.pending:
            failed = self.failed_on.get(index, {})
            if self.live <= failed.keys():
                errors = "\n".join(f"  {url}: {error}" for url, error in failed.items())
                errors += "".join(f"\n  {s.stats.url}: retired before it could try ({s.stats.retired})"
                                  for s in self.servers if s.stats.retired and s.stats.url not in failed)
                self.error = FanoutError(
                    f"job {self.jobs[index].key!r} failed on every server it could run on:\n{errors}\n"
                    f"Fix that job's graph or the servers' models and re-run: the {self.stats.done_images} "
                    "image(s) done are kept, and the run resumes from them.")
                self.draining = True  # the jobs being generated elsewhere are finished and saved
                return


def run_jobs(jobs: Sequence[ImageJob], clients: Sequence[ComfyClient], log: Callable[[str], object] = print,
             timeout: float = 3600, poll: float = 0.05) -> FanoutStats:
    """Generate every job's images on the servers of `clients` (one worker each, one queue),
    skipping jobs complete on disk; returns the run's figures.

    timeout: seconds one job may take on a server before that server is retired.
    poll: seconds between two looks at a running job's state.
    Raises ValueError/FileNotFoundError for jobs that cannot run (before any work) and
    FanoutError when the run stops (its .stats say what was done); what `log` raises stops
    the run and is raised here, the jobs finished until then saved.
    """
    records = check_jobs(jobs, clients)
    return _Run(jobs, records, clients, log, timeout, poll).run()


__all__ = ["MANIFEST", "FanoutError", "FanoutStats", "ImageJob", "ServerStats", "check_jobs", "encode_png",
           "file_sha256", "run_jobs", "save_png"]
