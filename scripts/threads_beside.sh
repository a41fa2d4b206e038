#!/bin/bash
# Training beside another job (docs/performance.md): two copies of one SmolLM2 LoRA INS-DPO training run side by
# side, each alone first; both at INSPO_THREADS=2 (torch's default count here, fixed), then both at the default
# (threads follow the machine, inspo_core/threads.py). Seconds per step and threads per step from metrics.jsonl.
#   bash scripts/threads_beside.sh PAIRS.jsonl [MODEL_DIR] [OUT_DIR]
# PAIRS: a preference file, e.g. the sentiment world's pairs-s0.jsonl (CACHE/worlds/<key>/, written by
# `python -m workbench demo --world sentiment`); MODEL_DIR: `python -m workbench models --fetch smollm2`'s checkpoint.
set -u
DATA=${1:?a pairs file}
MODEL=${2:-.cache/inspo/models/smollm2}
OUT=${3:-runs/threads-beside}
mkdir -p "$OUT"
train() {  # name, INSPO_THREADS, time limit: one run of 12 steps, its log beside it
  export INSPO_THREADS=$2
  timeout $3 python -m workbench train --model $MODEL --data $DATA --strategy symmetric --lora 16 --lr 1e-3 --batch_size 8 --max_length 192 --packing tree --max_steps 12 --val_size 0 --eval_every 0 --save_every 0 --seed 0 --output_dir $OUT/$1 --overwrite 2>&1 | tee $OUT/$1.log > /dev/null
}
train alone-default auto 600
train alone-fixed 2 600
train pair-fixed-a 2 330 & sleep 20; train pair-fixed-b 2 310; wait
train pair-default-a auto 600 & sleep 20; train pair-default-b auto 600; wait
for f in "$OUT"/*/metrics.jsonl; do
  python - "$f" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if '"loss"' in line]
print(sys.argv[1], "s/step", [round(8 / r["pairs_per_s"], 1) for r in rows], "threads", [r.get("threads") for r in rows])
PY
done
