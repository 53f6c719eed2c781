#!/usr/bin/env bash
# The main job: set up (or reuse) the host, then generate headless through ComfyUI's API.
# Arguments go to the generator: bash scripts/run.sh --prompt "..." --out out/
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup_host.sh"
source "$repo/.host/env"
cd "$repo"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PYTHON" -m headless.generate "$@"
