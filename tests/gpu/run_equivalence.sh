#!/usr/bin/env bash
# GPU stage (Jenkinsfile): TP2 / PP2 / TP2+SP with NCCL and the TransformerEngine layer spec must equal TP1 on one GPU.
# Needs >= 2 GPUs, NeMo (<= 2.4.1) with apex and TransformerEngine (NVIDIA's container) and a base .nemo + data:
#   bash tests/gpu/run_equivalence.sh BASE.nemo DATA_DIR [OUT_DIR]
# Exit status: 0 = every run compared equal to TP1; 77 = not run (fewer than 2 GPUs: nothing compared; the Jenkinsfile
# stage marks the build UNSTABLE); anything else = a run failed or differed.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ $# -ge 2 ] || { echo "usage: bash tests/gpu/run_equivalence.sh BASE.nemo DATA_DIR [OUT_DIR]" >&2; exit 2; }
base=$1; data=$2; out=${3:-$(mktemp -d)}
ngpu=$(python -c "import torch; print(torch.cuda.device_count())")
if [ "$ngpu" -lt 2 ]; then
  echo "SKIP: $ngpu GPU visible; the TP2/PP2/TP2+SP equivalence needs >= 2 GPUs, nothing was compared" >&2
  exit 77
fi
run() { name=$1; n=$2; shift 2
  torchrun --nproc_per_node="$n" --master_port=$((29500 + RANDOM % 1000)) tests/distributed/driver.py \
    --accelerator gpu --te --base "$base" --data "$data" --out "$out/$name.pt" "$@" > "$out/$name.log" 2>&1 \
    || { tail -40 "$out/$name.log"; exit 1; }; }
run tp1 1
run tp2 2 --tp 2
run pp2 2 --pp 2
run tp2_sp 2 --tp 2 --sp
RTOL=${RTOL:-1e-4} python -m tests.distributed.compare "$out/tp1.pt" "$out/tp2.pt" "$out/pp2.pt" "$out/tp2_sp.pt"
