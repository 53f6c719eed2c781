"""Worker processes of the dataset builder.

Each worker makes its own face encoder from the EncoderSpec (onnxruntime sessions do
not pickle) and its own caption token finder, then turns people into PersonResults.
The builder's process hands out consecutive names and takes the results back in the
order it handed them out, with a bounded number of people in flight, so the dataset
does not depend on the number of workers and memory does not grow with the dataset.

Workers never fork from the builder's process, which may hold onnxruntime/torch thread
pools and CUDA state. Where the platform has it they fork from multiprocessing's fork
server, which imports torch, ComfyUI's tokenizer and the token finder once
(`_preload`), so a worker starts in a fraction of a second instead of redoing
seconds of imports; elsewhere they are spawned.
"""
from __future__ import annotations

import logging
import multiprocessing
import os
import sys
import threading
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator

_worker: dict = {}
IN_FLIGHT_PER_WORKER = 4  # chunks handed out ahead per worker: keeps workers busy, bounds memory


def _watch_builder(builder: int) -> None:
    # A builder killed with SIGKILL cannot stop its workers; they stop themselves once it is
    # gone. A worker forked by the fork server has that server as its parent, and the server
    # lives as long as any worker does, so the builder itself is watched too.
    parent = os.getppid()

    def gone() -> bool:
        if os.getppid() != parent:
            return True
        if os.name != "posix":  # os.kill(pid, 0) is a probe only on POSIX
            return False
        try:
            os.kill(builder, 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # alive, another user's (cannot be ours, but not gone)
            return False
        return False

    def watch() -> None:
        while not gone():
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="builder-watch", daemon=True).start()


class _Quiet(logging.Filter):
    """Drops the face encoder's set-up notices (CPU provider, mask fallback) in a worker:
    the builder's process made the same encoder from the same spec and printed them once."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR


def _init(spec, source: str, settings, comfyui: str | None, threads: int, builder: int) -> None:
    _watch_builder(builder)
    # What a worker does log reads like the builder's own lines ("%(message)s", as the command
    # line sets it), not "WARNING:portraitbooth.face:..." from the root logger's first use.
    logging.basicConfig(format="%(message)s", force=True)
    # Each worker its share of the cores (onnxruntime reads OMP_NUM_THREADS when it makes a
    # session), unless the user capped the threads for the whole run.
    cap = os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    import torch

    torch.set_num_threads(int(cap) if cap.isdigit() else threads)
    if comfyui:
        os.environ.setdefault("COMFYUI_PATH", comfyui)
    from headless.comfyui import find_comfyui, import_comfyui

    import_comfyui(cpu=True, path=find_comfyui())  # the tokenizer only; face models pick their device
    from .analyze import PersonAnalyzer, default_finder

    _worker["source"] = Path(source)
    face_log, quiet = logging.getLogger("portraitbooth.face"), _Quiet()
    face_log.addFilter(quiet)
    try:
        encoder = spec.create()
    finally:
        face_log.removeFilter(quiet)
    _worker["analyzer"] = PersonAnalyzer(Path(source), encoder, settings, default_finder())


def _work(names: list[str]) -> list[tuple[str, object]]:
    from .sources import scan_person

    out = []
    for name in names:
        person = scan_person(_worker["source"], name)
        out.append((name, None if person is None else _worker["analyzer"](person)))
    return out


def _context():
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    # Only heeded when this process starts its fork server (the first pool); later pools reuse it.
    context.set_forkserver_preload([f"{__package__}._preload"])
    return context


def _comfyui_path() -> str | None:
    comfy = sys.modules.get("comfy")
    paths = list(getattr(comfy, "__path__", []) or [])
    return str(Path(paths[0]).parent) if paths else None


def analyzed_people(spec, source: Path, settings, names: list[str], workers: int,
                    chunk: int | None = None) -> Iterator[tuple[str, object]]:
    """(name, PersonResult or None) for every name, in the order of `names`, computed by
    `workers` processes."""
    if not names:
        return
    if chunk is None:  # a few people per task: less inter-process traffic for small people
        chunk = max(1, min(16, len(names) // (workers * 8)))
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(workers, mp_context=_context(), initializer=_init,
                               initargs=(spec, str(source), settings, _comfyui_path(), threads, os.getpid()))
    chunks = iter([names[i:i + chunk] for i in range(0, len(names), chunk)])
    flight: deque = deque()
    try:
        for part in chunks:
            flight.append(pool.submit(_work, part))
            if len(flight) >= workers * IN_FLIGHT_PER_WORKER:
                break
        while flight:
            results = flight.popleft().result()
            following = next(chunks, None)
            if following is not None:
                flight.append(pool.submit(_work, following))
            yield from results
    finally:
        for future in flight:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
