#!/usr/bin/env bash
# Run the test suite against another ComfyUI folder (a newer release, your own install):
#   bash scripts/test_against.sh ~/ComfyUI-0.8.0 [~/ComfyUI-0.8.0/venv/bin/python] [pytest args...]
# The Python defaults to the folder's venv/bin/python, else python3. The pack's own
# requirements are installed into that Python; its env file and stamps live in a host
# folder of its own, so the default test host is never touched (see setup_host.sh).
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
[ $# -ge 1 ] || { echo "usage: bash scripts/test_against.sh COMFYUI_FOLDER [PYTHON] [pytest args...]" >&2; exit 2; }
comfy=$(cd "$1" 2>/dev/null && pwd) || { echo "$1 is not a folder: give a ComfyUI folder." >&2; exit 2; }
shift
[ -f "$comfy/main.py" ] || { echo "$comfy has no main.py: give a ComfyUI folder." >&2; exit 2; }
if [ $# -ge 1 ] && [ -x "$1" ] && [ -f "$1" ]; then
  python=$1
  shift
elif [ -x "$comfy/venv/bin/python" ]; then
  python=$comfy/venv/bin/python
else
  python=python3
fi
COMFYUI_PATH=$comfy COMFYUI_PYTHON=$python exec bash "$repo/scripts/test.sh" "$@"
