#!/usr/bin/env bash
# Packaging check: build the wheel from a clean export of HEAD, install it (no deps) into a fresh virtual environment
# whose dependencies come from an existing environment (offline machines: no index to resolve torch from), and run
# `medetect demo` from the INSTALLED package, outside the repository, with the shipped weights.
#   bash experiments/check_wheel.sh [--smoke] [PYTHON_OF_AN_ENV_WITH_THE_DEPENDENCIES] [WORK_DIR]
# --smoke runs `medetect predict` with the packaged blood-cell detector on one packaged image instead of the whole
# demo (seconds). Prints the demo summary (or the prediction's files); exit code 0 when it ran from the wheel.
set -euo pipefail
SMOKE=0
if [[ "${1:-}" == "--smoke" ]]; then SMOKE=1; shift; fi
ENV_PY=${1:-$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python}
WORK=${2:-$(mktemp -d)}
REPO=$(cd "$(dirname "$0")/.." && pwd)
rm -rf "$WORK/src" "$WORK/dist" "$WORK/venv" "$WORK/run"
mkdir -p "$WORK/src" "$WORK/run"
git -C "$REPO" archive HEAD | tar -x -C "$WORK/src"
"$ENV_PY" -m pip wheel "$WORK/src" --no-deps --no-build-isolation -w "$WORK/dist" -q
WHEEL=$(ls "$WORK"/dist/medetect-*.whl)
unzip -l "$WHEEL" | grep -q "medetect/weights/bccd_faster_rcnn.safetensors"
BASE=$("$ENV_PY" -c 'import sys; print(sys._base_executable)')
"$BASE" -m venv --without-pip "$WORK/venv"
SITE=$(ls -d "$WORK"/venv/lib/python3*/site-packages)
"$ENV_PY" -c 'import site; print(site.getsitepackages()[0])' > "$SITE/_deps.pth"   # dependencies only
# --ignore-installed: without it pip would first uninstall the medetect it finds in ENV_PY (a developer's editable install)
"$ENV_PY" -m pip install --no-deps --no-index --ignore-installed --prefix "$WORK/venv" "$WHEEL" -q
cd "$WORK/run"
"$WORK/venv/bin/python" -c "import medetect; assert medetect.__file__.startswith('$WORK/venv/'), medetect.__file__"
# (pip of the other environment wrote the console script's shebang for its own python: run the module instead)
if [[ $SMOKE == 1 ]]; then
  PKG=$("$WORK/venv/bin/python" -c 'import medetect, os; print(os.path.dirname(medetect.__file__))')
  "$WORK/venv/bin/python" -m medetect predict --weights "$PKG/weights/bccd_faster_rcnn.safetensors" \
    "$PKG/assets/bccd/BloodImage_00000.jpg" --out "$WORK/run/predict" --threads 1
  ls "$WORK/run/predict"
else
  "$WORK/venv/bin/python" -m medetect demo --out "$WORK/run/demo"
fi
