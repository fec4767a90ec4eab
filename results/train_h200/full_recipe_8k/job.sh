#!/usr/bin/env bash
# H200 2026-12-03, second machine (code 366ef0a): the full recipe's drafter ((9): distill 25,056
# prompts + 13,227 raw replies, k = 3, layers 2, 12, 24, 9,000 steps) and its draft vocabulary,
# brought back whole in 15 MB pieces (the protocol ran in a later session on the carried drafter:
# ../../specbench_qwen05b_h200_480q_1024_interleaved/job.sh). TIME_LIMIT=310 stopped training at
# step ~8,990, before the step-9,000 checkpoint: the export took step 8,000. The 18-question look
# at the end did not run (no device time left). Call sequence: setup (the wheels, the ShareGPT
# prompts, question.jsonl, this script), the conversation pack, the 20 model pieces, the last
# starting `models` and this script.
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo26
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 300; i++)); do [[ -e /tmp/models.done ]] && break; sleep 2; done
( time OUT=$K bash launch/gpu_pipeline.sh distill qwen05b 25056 ) > $K/distill.log 2>&1
stamp distill
( time OUT=$K RUN=layers TIME_LIMIT=310 bash launch/gpu_pipeline.sh train qwen05b qwen05b \
    --config.drafter.num_masks=3 --config.drafter.feature_layers=2,12,24 \
    --config.data.jsonl_dir=/tmp/distilled/qwen05b,/tmp/conversation/qwen05b \
    --config.total_steps=9000 --config.eval_every=9000 --config.checkpoint_every=1000 ) \
    > $K/train.log 2>&1
stamp train
( time python3 experiments/draft_vocab.py --data /tmp/distilled/qwen05b,/tmp/conversation/qwen05b \
    --drafter $K/drafter_qwen05b_layers --out $K/draft_vocab.json ) > $K/draft_vocab.log 2>&1
stamp draft_vocab
mkdir -p /tmp/back && (cd $K && tar cf - drafter_qwen05b_layers) | split -b 15M - /tmp/back/drafter.tar.part
stamp back
T=results/tree_design_lookup_qwen05b_cpu
( time timeout 300 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged --interleave \
    --drafter $K/drafter_qwen05b_layers --ps_lookup_tree $T/tree_lookup_decoded.json:8 \
    --max_new_tokens 1024 --limit 3 \
    --methods ar,ar_rows9,parallelspec_lookup,parallelspec_lookup_v32768 \
    --reference ar_rows9 --out_dir $K/q18 ) > $K/q18.log 2>&1
stamp q18
