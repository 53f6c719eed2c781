#!/usr/bin/env bash
# Set up (or reuse) the host, then run the test suite against it.
#   bash scripts/test.sh            the whole suite (CI runs this)
#   bash scripts/test.sh --quick    leaves out the tests marked slow (pytest.ini): a few minutes
# Other arguments go to pytest: bash scripts/test.sh --quick -k face
set -euo pipefail
repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
args=()
for arg in "$@"; do
    if [ "$arg" = "--quick" ]; then
        args+=(-m "not slow")
    else
        args+=("$arg")
    fi
done
bash "$repo/scripts/setup_host.sh"
source "$repo/.host/env"
cd "$repo"
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} exec "$PYTHON" -m pytest ${args[@]+"${args[@]}"}
