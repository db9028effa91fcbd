#!/usr/bin/env bash
# The GPU check of R&B Balance: run it by hand on a machine with CUDA (never in CI). At most 8 minutes: each part
# has its own timeout, and a part that fails or times out is reported while the others still run.
#
#     bash scripts/gpu_check.sh [OUT_DIR]        # default OUT_DIR: gpu_check/ (tables, JSON and summary.txt land there)
#
# 1. the `gpu`-marked tests: the tracker against per-domain autograd on CUDA, no host sync in a micro-batch
#    (torch.cuda.set_sync_debug_mode("error")), bf16 autocast, fp16 + GradScaler, pinned memory, QLoRA (skipped,
#    saying so, without bitsandbytes);
# 2. `rbvl bench balance` on CUDA in bf16 autocast with the base in the recipe's bf16 (how LoRA trains on a GPU),
#    tracking off / exact / sketched / naive / linears (exact with PEFT's LoRA forward through each tracked linear),
#    wall-clock ratios in one run each (R&B's claim is about this figure;
#    goal: sketched <= 1% over off): on a 2-layer slice of the 7B model's width (a short, launch-bound step), and on
#    the whole 32-layer 7B language model at 4 x 1024 tokens (the GPU-bound step a 7B LoRA run takes);
# 3. `rbvl bench train` on CUDA: rbvl train (stratified, rnb, and rnb with each tracked linear on its own function)
#    and BalanceTrainer against a plain Trainer.
# `rbvl bench balance --dispatch` (operations per micro-batch) counts the same on any device: run it anywhere.
#
# Environment: PYTHON (default python), SKIP (space-separated part names to leave out: tests slice full train).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu_check}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PY=${PYTHON:-python}
SKIP=" ${SKIP:-} "
$PY - <<'PY' 2>&1 | tee "$OUT/summary.txt" || exit 1
import sys
import torch
if not torch.cuda.is_available():
    sys.exit("gpu_check: no CUDA device here")
import peft, transformers
print(f"gpu_check on {torch.cuda.get_device_name(0)}: torch {torch.__version__}, transformers "
      f"{transformers.__version__}, peft {peft.__version__}, Python {sys.version.split()[0]}")
from rbvl.balance.grouped import _grouped_mode
modes = {str(dt).removeprefix("torch."): _grouped_mode(torch.device("cuda"), dt)
         for dt in (torch.bfloat16, torch.float16, torch.float32)}
print("grouped products without a host sync (sorted rows; None: the one-hot product):", modes)
PY

failed=()
# part NAME SECONDS COMMAND...: runs COMMAND under a timeout, its output into $OUT/NAME.txt, and notes how it ended
part() {
    local name=$1 limit=$2
    shift 2
    if [[ $SKIP == *" $name "* ]]; then
        echo "== $name: skipped (SKIP)" | tee -a "$OUT/summary.txt"
        return
    fi
    echo
    echo "== $name ($(date +%T), at most ${limit} s)"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.txt"
    local rc=${PIPESTATUS[0]} how=ok
    if ((rc == 124)); then how="timed out"; elif ((rc != 0)); then how="failed (exit $rc)"; fi
    [[ $how == ok ]] || failed+=("$name")
    echo "== $name: $how in $((SECONDS - start)) s" | tee -a "$OUT/summary.txt"
}

part tests 90 $PY -m pytest -q -rs -m gpu $(grep -rl "mark.gpu" tests/)
part slice 100 $PY -m rbvl.cli bench balance --device cuda --autocast bf16 --slice-layers 2 --seq 512 --batch 2 \
    --rounds 9 --windows 2 --no-peers --json "$OUT/slice.json"
part full 150 $PY -m rbvl.cli bench balance --device cuda --autocast bf16 --slice-layers 32 --seq 1024 --batch 4 \
    --rounds 3 --windows 1 --no-peers --json "$OUT/full.json"
part train 120 $PY -m rbvl.cli bench train --rounds 3 --tracker-rounds 21 --arms stratified,rnb,balance_hf,trainer,rnb_linears \
    --json "$OUT/train.json"
echo
if ((${#failed[@]})); then
    echo "gpu_check: ${failed[*]} did not pass; see $OUT/" | tee -a "$OUT/summary.txt"
    exit 1
fi
echo "gpu_check: all parts ran; tables in $OUT/" | tee -a "$OUT/summary.txt"
