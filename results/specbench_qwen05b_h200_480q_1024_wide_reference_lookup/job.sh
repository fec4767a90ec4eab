#!/usr/bin/env bash
# H200, 2026-12-02 (code ee99db1): (a) the drafter again ((9)'s recipe: distill 25,056 prompts + 13,227 raw replies,
# k = 3, layers 2, 12, 24, 9,000 steps), (b) the greedy protocol with the lookup in front checked
# against ar_rows9 (8-node tree: 9-row verify passes), (c) bench_decode: one-row and multi-row
# steps against transformers. Setup call first: carry .whl and .carry, run
#   bash launch/gpu_pipeline.sh setup && bash launch/gpu_pipeline.sh unpack qwen05b conversation
# then the 20 pieces, the last starting `models` (-> /tmp/models.done) and this script.
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo20
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 300; i++)); do [[ -e /tmp/models.done ]] && break; sleep 5; done
( time OUT=$K bash launch/gpu_pipeline.sh distill qwen05b 25056 ) > $K/distill.log 2>&1
stamp distill
( time OUT=$K RUN=layers TIME_LIMIT=560 bash launch/gpu_pipeline.sh train qwen05b qwen05b \
    --config.drafter.num_masks=3 --config.drafter.feature_layers=2,12,24 \
    --config.data.jsonl_dir=/tmp/distilled/qwen05b,/tmp/conversation/qwen05b \
    --config.total_steps=9000 --config.eval_every=9000 --config.checkpoint_every=1000 ) \
    > $K/train.log 2>&1
stamp train
T=results/tree_design_lookup_qwen05b_cpu
( time timeout 700 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged \
    --drafter $K/drafter_qwen05b_layers --ps_lookup_tree $T/tree_lookup_decoded.json:8 \
    --max_new_tokens 1024 --methods ar,ar_rows9,parallelspec_lookup --reference ar_rows9 \
    --out_dir $K/widefull ) > $K/widefull.log 2>&1
stamp widefull
( time timeout 400 python3 experiments/bench_decode.py --model /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl \
    --methods psjax_ar,psjax_ar_rows2,psjax_ar_rows4,psjax_ar_rows9,hf_static_compiled \
    --out $K/bench_ar_qwen05b.json ) > $K/bench_ar.log 2>&1
stamp bench_ar
