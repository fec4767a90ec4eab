#!/usr/bin/env bash
# Session 28 (HEAD 35418ba). Issue 3's bfloat16 check against autoregressive steps as wide as the
# verify pass (ar_rows9; pld's chain of 8 is a 9-row pass), then issue 2's one-row speed since
# common.step_pass. No drafter this session (the git-ignored kit was lost with the checkout).
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo18
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 300; i++)); do [[ -e /tmp/models.done && -e $K/probe.done ]] && break; sleep 5; done
E="python3 experiments/eval_specbench.py --target /tmp/models/qwen05b --questions /tmp/spec_bench.jsonl
   --prompt_width 512,2048 --text diverged --pld_k 8 --reference ar_rows9"
( time timeout 300 $E --max_new_tokens 256 --limit 3 --methods ar,ar_rows9,pld \
    --out_dir $K/wide18 ) > $K/wide18.log 2>&1
stamp wide18
( time timeout 200 python3 experiments/bench_decode.py --model /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --methods psjax_ar \
    --out $K/bench_ar_qwen05b.json ) > $K/bench_ar.log 2>&1
stamp bench_ar
( time timeout 700 $E --max_new_tokens 1024 --methods ar,ar_rows9,pld \
    --out_dir $K/widefull ) > $K/widefull.log 2>&1
stamp widefull
