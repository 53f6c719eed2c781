"""Test servers own their state: a run neither depends on nor changes what the host's
ComfyUI keeps in its user/, models/, input/, output/ and temp/ folders."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import pytest

from conftest import COMFY_DIR, HOST_STATE_AT_START, HOST_STATE_FOLDERS, SESSION_BASE, host_state
from frontend import need_chromium, open_frontend, visible_alerts
from headless.server import FRONTEND_SETTINGS, ComfyServer
from test_host import FAKE_COMFYUI_ANSWERS

# A stand-in for ComfyUI's main.py that writes the arguments it got to argv[1], then answers.
RECORD_ARGS_AND_ANSWER = "import json, sys\nopen(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))\n" + \
    FAKE_COMFYUI_ANSWERS


def test_every_server_keeps_user_input_output_and_temp_in_its_work_dir_with_seeded_settings(tmp_path):
    # A stand-in for the Python that runs main.py: it records the arguments and answers.
    record = tmp_path / "args.json"
    python = tmp_path / "python"
    python.write_text(f"#!/bin/sh\nexec {shlex.quote(sys.executable)} -c {shlex.quote(RECORD_ARGS_AND_ANSWER)} "
                      f"{shlex.quote(str(record))} \"$@\"\n")
    python.chmod(0o755)
    work, base = tmp_path / "work", tmp_path / "base"
    settings = work / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps({"Comfy.TutorialCompleted": False, "Kept.Setting": 3}))  # from a run before
    with ComfyServer(work, python=str(python), base_dir=base):
        args = json.loads(record.read_text())
    given = {flag: args[args.index(flag) + 1] for flag in ("--user-directory", "--input-directory",
                                                          "--output-directory", "--temp-directory",
                                                          "--base-directory")}
    for flag, value in given.items():
        assert Path(value).is_relative_to(base if flag == "--base-directory" else work), (flag, value)
    assert json.loads(settings.read_text()) == {**FRONTEND_SETTINGS, "Kept.Setting": 3}
    assert (base / "custom_nodes").is_dir()  # ComfyUI lists it and fails if it is missing


@pytest.mark.slow  # a server of its own
def test_a_server_on_a_never_started_comfyui_opens_the_frontend_with_no_dialog_and_writes_nothing_there(
        fresh_comfyui, start_server, monkeypatch):
    """The README's test command on a fresh machine: the frontend sees a user who never
    started it, unless the server brings its own settings."""
    need_chromium()
    monkeypatch.setenv("COMFYUI_PATH", str(fresh_comfyui))
    server = start_server()
    assert server.comfy == fresh_comfyui
    with open_frontend(server.url) as page:
        page.wait_for_timeout(1000)  # a dialog opened late would show now
        alerts = visible_alerts(page)
        nodes = page.evaluate("() => (window.app.graph._nodes || window.app.graph.nodes).length")
        assert page.page_errors == []
    assert alerts == [], f"the frontend opened on a fresh ComfyUI with: {[a[:200] for a in alerts]}"
    assert nodes > 0, "the frontend did not load its default workflow"
    assert host_state(fresh_comfyui) == {name: ("missing",) for name in HOST_STATE_FOLDERS}, \
        "the server wrote into the ComfyUI it runs from"
    assert (server.user_dir / "default" / "comfy.settings.json").is_file()


def test_the_session_folder_is_comfyuis_base_in_process():
    import folder_paths

    for folder in (folder_paths.models_dir, folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                   folder_paths.get_temp_directory(), folder_paths.get_user_directory()):
        assert Path(folder).is_relative_to(SESSION_BASE), folder


def _differences(before: dict, after: dict) -> list[str]:
    return ([f"added   {p}" for p in sorted(after.keys() - before.keys())]
            + [f"removed {p}" for p in sorted(before.keys() - after.keys())]
            + [f"changed {p}: {before[p]} -> {after[p]}" for p in sorted(before.keys() & after.keys())
               if before[p] != after[p]])


def test_the_run_left_the_hosts_state_folders_as_it_found_them():
    changed = _differences(HOST_STATE_AT_START, host_state(COMFY_DIR))
    assert not changed, (
        f"this run changed {COMFY_DIR}'s {', '.join(HOST_STATE_FOLDERS)} folders, which tests must leave "
        f"alone (their files go into the session folder or a server's work dir). Another test run, or a "
        f"ComfyUI, using the same folder at the same time also shows here.\n" + "\n".join(changed[:30]))


test_the_run_left_the_hosts_state_folders_as_it_found_them.runs_last = True  # see conftest
