#!/usr/bin/env bash
# After job18: autoregressive steps of N rows, N in {1, 2, 4, 8, 9, 16}: which width is fastest.
set -uo pipefail
K=/tmp/keep
for ((i = 0; i < 200; i++)); do [[ -e $K/widefull.done ]] && break; sleep 3; done
cd /tmp/jobrepo18
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
( time timeout 280 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged \
    --max_new_tokens 256 --limit 3 --methods ar,ar_rows2,ar_rows4,ar_rows8,ar_rows9,ar_rows16 \
    --out_dir $K/rows_sweep ) > $K/rows_sweep.log 2>&1
date -u +%T > $K/rows_sweep.done
