#!/usr/bin/env bash
# The GPU check of R&B Balance: run it by hand on a machine with CUDA (never in CI). At most 8 minutes: each part
# has its own timeout (2 + 3.3 + 1.5 + 2 min).
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check/ (tables and JSON land there)
#
# 1. the `gpu`-marked tests: the tracker against per-domain autograd on CUDA, no host sync in a micro-batch
#    (torch.cuda.set_sync_debug_mode("error")), bf16 autocast, fp16 + GradScaler, pinned memory;
# 2. `rbvl bench balance` on a 2-layer slice of the 7B model's width on CUDA: tracking off / exact / sketched / naive,
#    wall-clock ratios in one run (R&B's claim is about this figure; goal: sketched <= 1% over off);
# 3. `rbvl bench balance --dispatch`: operations per micro-batch (the same on any device);
# 4. `rbvl bench train` on CUDA: rbvl train (stratified, rnb) and BalanceTrainer against a plain Trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PY=${PYTHON:-python}
$PY - <<'PY'
import torch, sys
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here")
print("gpu_check on", torch.cuda.get_device_name(0), "torch", torch.__version__)
PY

step() { echo; echo "== $1 ($(date +%T))"; }

step "gpu-marked tests"
timeout 120 $PY -m pytest -q -m gpu tests/ 2>&1 | tee "$OUT/tests.txt"

step "bench balance: 7B-width slice on CUDA"
timeout 200 $PY -m rbvl.cli bench balance --device cuda --slice-layers 2 --seq 512 --batch 2 --rounds 5 --windows 2 \
    --no-peers --json "$OUT/balance.json" 2>&1 | tee "$OUT/balance.txt"

step "bench balance --dispatch"
# CPU-bound (2 min of CPU time on a 2-core dev box); its counts are the same on any device, so a timeout here is
# reported and the check goes on
timeout 90 $PY -m rbvl.cli bench balance --dispatch --json "$OUT/dispatch.json" 2>&1 | tee "$OUT/dispatch.txt" \
    || echo "bench balance --dispatch did not finish in 90 s (its table is the same on any machine)"

step "bench train on CUDA"
timeout 120 $PY -m rbvl.cli bench train --rounds 3 --json "$OUT/train.json" 2>&1 | tee "$OUT/train.txt"

step "done: $OUT/"
timeout 300 $PY -m pytest -q -rs -m gpu tests/test_qlora.py 2>&1 | tee "$OUT/qlora.txt"   # QLoRA: 4-bit base, tracked adapters (says so if bitsandbytes is missing)
