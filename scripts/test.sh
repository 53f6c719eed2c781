#!/usr/bin/env bash
# Set up (or reuse) the host, then run the whole test suite against it.
# Arguments go to pytest: bash scripts/test.sh -k face
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$repo/scripts/setup_host.sh"
source "$repo/.host/env"
cd "$repo"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PYTHON" -m pytest "$@"
