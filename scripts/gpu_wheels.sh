#!/usr/bin/env bash
# What the GPU check (scripts/gpu_check.sh) carries to the GPU machine, made here:
#   .whl/*.whl              the packages of requirements/gpu-wheels.txt for CPython 3.12 on x86-64 Linux (PyPI's
#                           cp312 manylinux or pure-Python wheels; those marked "build" built here from the sdist)
#   .whl/nemo_helpers/      NeMo's SFT dataset C++ helper, compiled for Python 3.12 (the machine may lack a compiler
#                           or Python's headers; NeMo otherwise compiles it at the first training step)
#   .cache/gpu_check/       the embedded demo data and base .nemo (pre-trained here once, on CPU)
# then prints the sizes and fails if the repository + all of it exceed 64 MiB (the limit of one call).
#   bash scripts/gpu_wheels.sh            needs the pinned .venv (bash scripts/run.sh install) and a python3.12
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${NEMO_TIEDLORA_VENV:-$ROOT/.venv}/bin/python
[ -x "$PY" ] || { echo "gpu_wheels: no $PY: run 'bash scripts/run.sh install' first" >&2; exit 2; }
find_py312() {  # the first that runs: $PY312, python3.12 on PATH, pyenv's 3.12
  local candidate
  for candidate in ${PY312:-} python3.12 "$(pyenv root 2>/dev/null || echo ~/.pyenv)"/versions/3.12*/bin/python3.12; do
    "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' > /dev/null 2>&1 \
      && { echo "$candidate"; return; }
  done
}
PY312=$(find_py312)
[ -n "$PY312" ] || {
  echo "gpu_wheels: no working python3.12 (PATH or pyenv): set PY312=/path/to/python3.12" >&2; exit 2; }

WHL=$ROOT/.whl
mkdir -p "$WHL/nemo_helpers"
BUILD=$(mktemp -d)
trap 'rm -rf "$BUILD"' EXIT
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
           --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
mapfile -t LINES < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' requirements/gpu-wheels.txt)
downloads=() builds=()
for line in "${LINES[@]}"; do
  read -r spec how _ <<< "$line"
  if [ "${how:-}" = build ]; then builds+=("$spec"); else downloads+=("$spec"); fi
done

# A Python 3.12 build environment: the "build" sdists and NeMo's helper need setuptools, wheel and pybind11.
"$PY312" -m venv "$BUILD/venv"
"$BUILD/venv/bin/python" -m pip install -q setuptools wheel pybind11
export PATH=$BUILD/venv/bin:$PATH   # megatron-core's setup.py runs `python3 -m pybind11`

echo "[gpu_wheels] downloading ${#downloads[@]} wheels for CPython 3.12 into .whl/"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLATFORMS[@]}" \
  -d "$WHL" "${downloads[@]}"
echo "[gpu_wheels] building ${#builds[@]} from their sdists with $("$PY312" --version)"
for spec in "${builds[@]}"; do
  name=${spec%%==*}; norm=$(echo "$name" | tr 'A-Z.-' 'a-z__'); version=${spec#*==}
  ls "$WHL" | tr 'A-Z' 'a-z' | grep -q "^${norm}-${version}-" && continue
  "$BUILD/venv/bin/python" -m pip wheel -q --no-deps --no-build-isolation --no-binary=:all: -w "$WHL" "$spec"
done

# NeMo's helper: the same compile as its Makefile, for Python 3.12 (the sources come with the pinned NeMo).
helpers=$("$PY" -c \
  "import os, nemo.collections.nlp.data.language_modeling.megatron as m; print(os.path.dirname(m.__file__))")
ext=$("$BUILD/venv/bin/python" -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
if [ ! -f "$WHL/nemo_helpers/helpers$ext" ]; then
  g++ -O3 -Wall -shared -std=c++11 -fPIC $("$BUILD/venv/bin/python" -m pybind11 --includes) "$helpers/helpers.cpp" \
    -o "$WHL/nemo_helpers/helpers$ext.partial"
  mv "$WHL/nemo_helpers/helpers$ext.partial" "$WHL/nemo_helpers/helpers$ext"
fi

echo "[gpu_wheels] the embedded demo data and base (cached in .cache/gpu_check)"
"$PY" -m benchmarks.gpu_check prepare
"$PY" -m benchmarks.gpu_check plan --sizes-only
