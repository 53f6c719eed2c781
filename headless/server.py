"""Start a real ComfyUI on a free 127.0.0.1 port and stop it again, by its PID."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
from pathlib import Path

from .client import ComfyClient
from .comfyui import PACK_FOLDER_NAME, REPO, comfyui_dir, installed_pack_name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerStartError(RuntimeError):
    pass


# Seeded into every server's own user folder. Without it the frontend (1.32) takes a new
# user's first page load for a first start and opens its Templates browser over the canvas.
FRONTEND_SETTINGS = {"Comfy.TutorialCompleted": True}


class ComfyServer:
    """A ComfyUI process with its own state: input/, output/, temp/, user/ (settings seeded
    with FRONTEND_SETTINGS) and its log, all in its work dir, so that it neither reads nor
    writes what a person or an earlier server left in ComfyUI's own folders.

    base_dir: a folder that stands in for ComfyUI's own as the root of models/ (ComfyUI's
    --base-directory; its custom_nodes/ is made if missing, ComfyUI's own custom_nodes still
    load). Tests give every server one session folder: what they build or write there never
    lands in the host, and the host's models are not seen. None: ComfyUI's own models/.

    extra_model_paths: {folder kind: path} added through an extra_model_paths.yaml, so
    tests can point ComfyUI at stand-in models without touching the host's models/.
    The pack is this checkout: unless ComfyUI's own custom_nodes/ already holds it (a user's
    install), the server loads it from a custom_nodes folder of its own, so that several
    checkouts can run servers against one host at once. custom_node_dirs adds more
    folders of custom node packs (tests load other packs beside this one).
    """

    def __init__(self, workdir: str | os.PathLike | None = None, python: str | None = None,
                 extra_model_paths: dict[str, str] | None = None, env: dict | None = None,
                 cpu: bool = True, extra_args: list[str] | None = None,
                 custom_node_dirs: list[str | os.PathLike] | None = None,
                 base_dir: str | os.PathLike | None = None):
        self.comfy = comfyui_dir()
        self.python = python or sys.executable
        # A work dir made here is this server's to delete on stop(); a caller's is left alone.
        self.owns_workdir = workdir is None
        self.workdir = Path(workdir) if workdir is not None else Path(tempfile.mkdtemp(prefix="pb-comfy-"))
        self.input_dir = self.workdir / "input"
        self.output_dir = self.workdir / "output"
        self.temp_dir = self.workdir / "temp"  # ComfyUI appends "temp" to --temp-directory
        self.user_dir = self.workdir / "user"
        self.base_dir = Path(base_dir) if base_dir is not None else None
        self.log_path = self.workdir / "server.log"
        self.extra_model_paths = extra_model_paths or {}
        self.env = env or {}
        self.cpu = cpu and os.environ.get("PORTRAITBOOTH_TEST_GPU") != "1"
        self.extra_args = extra_args or []
        self.custom_node_dirs = [Path(d) for d in custom_node_dirs or []]
        self.pack_name = installed_pack_name(self.comfy) or PACK_FOLDER_NAME
        self.port: int | None = None
        self.proc: subprocess.Popen | None = None
        self.client: ComfyClient | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 120.0) -> ComfyClient:
        """Start ComfyUI and wait until it answers; on failure stop() has already run (its own
        work dir is gone), and the ServerStartError carries the log's tail."""
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> ComfyClient:
        for d in (self.input_dir, self.output_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._seed_user_dir()
        self.port = free_port()
        args = [self.python, str(self.comfy / "main.py"), "--listen", "127.0.0.1",
                "--port", str(self.port), "--disable-auto-launch", "--disable-api-nodes",
                "--database-url", "sqlite:///:memory:",
                "--input-directory", str(self.input_dir),
                "--output-directory", str(self.output_dir),
                "--temp-directory", str(self.workdir),
                "--user-directory", str(self.user_dir), *self.extra_args]
        if self.cpu:
            args.append("--cpu")
        node_dirs = list(self.custom_node_dirs)
        if self.base_dir is not None:
            # ComfyUI lists <base>/custom_nodes and fails if it is missing; its own folder is
            # no longer the default one then, so it is named here to load as before.
            (self.base_dir / "custom_nodes").mkdir(parents=True, exist_ok=True)
            args += ["--base-directory", str(self.base_dir)]
            node_dirs.append(self.comfy / "custom_nodes")
        if installed_pack_name(self.comfy) is None:
            own = self.workdir / "custom_nodes"
            own.mkdir(exist_ok=True)
            link = own / self.pack_name
            if not link.is_symlink():
                link.symlink_to(REPO, target_is_directory=True)
            node_dirs.insert(0, own)
        paths = {**self.extra_model_paths}
        if node_dirs:
            paths["custom_nodes"] = "|\n" + "".join(f"        {d}\n" for d in node_dirs)
        if paths:
            cfg = self.workdir / "extra_model_paths.yaml"
            lines = ["portraitbooth_tests:"] + [f"    {k}: {v}" for k, v in paths.items()]
            cfg.write_text("\n".join(lines) + "\n")
            args += ["--extra-model-paths-config", str(cfg)]
        env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
               "PYTHONUNBUFFERED": "1", **self.env}
        log = open(self.log_path, "wb")
        # Own process group: stop() can end ComfyUI and anything it spawned.
        self.proc = subprocess.Popen(args, cwd=self.comfy, stdout=log, stderr=subprocess.STDOUT,
                                     env=env, start_new_session=True)
        log.close()
        self.client = ComfyClient(self.url)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ServerStartError(f"ComfyUI exited with code {self.proc.returncode} during "
                                       f"start-up.\n--- server log tail ---\n{self.log_tail()}")
            try:
                self.client.get_json("/system_stats")
                return self.client
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.3)
        # start() stops the server (and may delete the log with the work dir): read the tail first.
        raise ServerStartError(f"ComfyUI did not answer within {timeout:.0f} s.\n"
                               f"--- server log tail ---\n{self.log_tail()}")

    def _seed_user_dir(self) -> None:
        """The frontend's settings for the default user, FRONTEND_SETTINGS over any kept ones
        (a caller's work dir may hold a server's settings from before)."""
        settings_path = self.user_dir / "default" / "comfy.settings.json"
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        settings_path.parent.mkdir(parents=True, exist_ok=True)
        settings_path.write_text(json.dumps({**settings, **FRONTEND_SETTINGS}, indent=4))

    def log_tail(self, lines: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 15.0) -> None:
        """End ComfyUI's process group, then delete the work dir if this server made it
        (outputs and the log with it: fetch them over HTTP or pass a workdir to keep them)."""
        try:
            if self.proc is not None and self.proc.poll() is None:
                pgid = os.getpgid(self.proc.pid)
                os.killpg(pgid, signal.SIGTERM)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    os.killpg(pgid, signal.SIGKILL)
                    self.proc.wait(timeout)
        finally:
            if self.owns_workdir:
                # ignore_errors: a straggler of the process group may still be closing files.
                shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
