#!/usr/bin/env bash
# The prepared GPU check, one call on one GPU (under 8 minutes on an H200): the carried wheels (.whl/, made by
# scripts/gpu_wheels.sh) installed into a target folder beside the machine's own torch, then
# python -m benchmarks.gpu_check run: pytest tests/gpu, the demo base through the NeMo entry script in fp32 /
# bf16-mixed / 16-mixed / bf16 O2, the Llama-2 7B layer-stack benchmark. Everything goes under $OUT (default
# out/gpu_check); the summary also to benchmarks/results/gpu_h200.md and .json.
#   bash scripts/gpu_check.sh             on the GPU machine (python3 there is the one with torch + CUDA)
#   bash scripts/gpu_check.sh --dry-run   here: every wheel present, the sizes, the plan and the estimated minutes
#   bash scripts/gpu_check.sh --parts demo,benchmark    a subset (a rerun of what failed)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export GPU_CHECK_STARTED=${GPU_CHECK_STARTED:-$(date +%s)} GPU_CHECK_COMMAND="bash scripts/gpu_check.sh $*"
PARTS=environment,benchmark,pytest,demo
case "${1:-}" in
  --dry-run)
    PY=${NEMO_TIEDLORA_VENV:-$ROOT/.venv}/bin/python
    [ -x "$PY" ] || PY=python3
    exec "$PY" -m benchmarks.gpu_check plan ;;
  --parts) PARTS=environment,$2 ;;
  "") ;;
  *) echo "usage: bash scripts/gpu_check.sh [--dry-run | --parts benchmark,pytest,demo]" >&2; exit 2 ;;
esac

OUT=${OUT:-$ROOT/out/gpu_check}
SITE=${GPU_CHECK_SITE:-/tmp/gpu_check_site}
SHIM=$SITE/.bin
mkdir -p "$OUT"
log=$OUT/install.log
ls .whl/*.whl > /dev/null 2>&1 || {
  echo "gpu_check: no .whl/*.whl: run bash scripts/gpu_wheels.sh here and carry .whl" >&2; exit 2; }
{
  echo "[install] $(ls .whl/*.whl | wc -l) wheels into $SITE (python3: $(command -v python3))"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  # NeMo's SFT dataset runs `make -C <its folder>` at the first step, which compiles its C++ helper with
  # python3-config, pybind11's headers and a C++ compiler. The helper compiled here for Python 3.12 is put in place,
  # newer than its source, and a python3-config first on PATH names this python3's extension suffix (a system one
  # may belong to another Python), so that make has nothing to do; without make, a stand-in that does nothing.
  helpers=$SITE/nemo/collections/nlp/data/language_modeling/megatron
  ext=$(python3 -c "import sysconfig; print(sysconfig.get_config_var('EXT_SUFFIX'))")
  cp ".whl/nemo_helpers/helpers$ext" "$helpers/" && touch "$helpers/helpers$ext"
  mkdir -p "$SHIM"
  printf '#!/bin/sh\necho %s\n' "$ext" > "$SHIM/python3-config"
  command -v make > /dev/null || printf '#!/bin/sh\nexit 0\n' > "$SHIM/make"
  chmod +x "$SHIM"/*
  PATH=$SHIM:$PATH make -C "$helpers"
  python3 -c "import importlib.util as u, sys
s = u.spec_from_file_location('helpers', sys.argv[1]); m = u.module_from_spec(s); s.loader.exec_module(m)
print('[install] NeMo dataset helper loads:', m.__file__)" "$helpers/helpers$ext"
} > "$log" 2>&1 || { tail -20 "$log"; echo "gpu_check: installing the carried wheels failed (log: $log)" >&2; exit 1; }
echo "[gpu_check] installed in $(( $(date +%s) - GPU_CHECK_STARTED )) s; running $PARTS"
export PATH=$SHIM:$PATH PYTHONPATH=$ROOT:$SITE   # the repository first: NeMo's wheel has top-level tests/, scripts/
exec python3 -m benchmarks.gpu_check run --out "$OUT" --parts "$PARTS"
