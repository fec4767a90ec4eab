#!/usr/bin/env bash
# H200 session 2026-12-03 (third, code 740b988): no distill or training. The full recipe's
# drafter trained by ../train_h200/full_recipe_8k/job.sh (k = 3, layers 2, 12, 24; its last
# checkpoint, step 8,000 of 9,000: TIME_LIMIT cut it) is carried back in 3 pieces to
# /tmp/dstage and joined here. Then the protocol (480 questions x 1,024) INTERLEAVED: ar,
# ar_rows9, the lookup in front with the full head and with 32,768 tokens, checked against
# ar_rows9; temperature 1 interleaved; the batch-8 grid. Calls: setup (+ the wheels,
# question.jsonl, this script, piece ac), pieces aa and ab, the 20 model pieces, the last
# starting `models` and this script, then polls.
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo27
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
cat /tmp/dstage/drafter.tar.part* | tee >(sha256sum > $K/drafter.sha256) | tar xf - -C $K
stamp drafter
for ((i = 0; i < 300; i++)); do [[ -e /tmp/models.done ]] && break; sleep 2; done
T=results/tree_design_lookup_qwen05b_cpu D=$K/drafter_qwen05b_layers
( time timeout 900 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged --interleave \
    --drafter $D --ps_lookup_tree $T/tree_lookup_decoded.json:8 \
    --max_new_tokens 1024 --methods ar,ar_rows9,parallelspec_lookup,parallelspec_lookup_v32768 \
    --reference ar_rows9 --out_dir $K/full ) > $K/full.log 2>&1
stamp full
( time timeout 480 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged --interleave \
    --drafter $D --ps_lookup_tree $T/tree_lookup_t1.json:8 \
    --max_new_tokens 1024 --temperature 1 --methods ar,parallelspec_lookup \
    --out_dir $K/t1full ) > $K/t1full.log 2>&1
stamp t1full
( time timeout 240 python3 experiments/bench_grid.py --target /tmp/models/qwen05b \
    --drafter $D --questions /tmp/spec_bench.jsonl \
    --methods ar,pld,parallelspec_lookup_n8 --ps_lookup_tree $T/tree_lookup_decoded.json:8 \
    --batch_sizes 8 --temperatures 0,1 --out $K/grid.json ) > $K/grid.log 2>&1
stamp grid
