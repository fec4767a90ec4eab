#!/usr/bin/env bash
# H200, 2026-12-03 (code 6b22552). `limits`: bench_limits at the 0.5B shape with and without a
# 32,768-token draft vocabulary (random weights: started at setup, before the model's pieces).
# `main`: after `models` and `limits`, a shortened recipe (the 13,227 raw ShareGPT replies only, no
# self-distillation, k = 3, layers 2, 12, 24, 3,000 steps), its draft vocabulary ranked from the
# same replies, then Spec-Bench (8 questions a category, up to 1,024 tokens, greedy) with the lookup
# in front, full head and a 32,768-token draft vocabulary. The device time left after a lost
# machine (the full recipe's job22 had trained, then the machine was released) allowed no more.
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo23
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
mkdir -p $K
T=results/tree_design_lookup_qwen05b_cpu
if [[ $1 == limits ]]; then
  rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/ && cd $R
  ( time timeout 400 python3 experiments/bench_limits.py --shapes qwen2.5-0.5b --k 3 \
      --feature_layers 2,12,24 --lookup_tree $T/tree_lookup_decoded.json:8 --draft_vocab 32768 \
      --profile_shape '' --xla_variants '' --out $K/limits.json ) > $K/limits.log 2>&1
  stamp limits; exit
fi
cd $R
for ((i = 0; i < 300; i++)); do [[ -e /tmp/models.done && -e $K/limits.done ]] && break; sleep 2; done
( time OUT=$K RUN=layers TIME_LIMIT=200 bash launch/gpu_pipeline.sh train qwen05b qwen05b \
    --config.drafter.num_masks=3 --config.drafter.feature_layers=2,12,24 \
    --config.data.jsonl_dir=/tmp/conversation/qwen05b \
    --config.total_steps=3000 --config.eval_every=3000 --config.checkpoint_every=1000 ) \
    > $K/train.log 2>&1
stamp train
( time python3 experiments/draft_vocab.py --data /tmp/conversation/qwen05b \
    --drafter $K/drafter_qwen05b_layers --out $K/draft_vocab.json ) > $K/draft_vocab.log 2>&1
stamp draft_vocab
( time timeout 300 python3 experiments/eval_specbench.py --target /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --prompt_width 512,2048 --text diverged --limit 8 \
    --drafter $K/drafter_qwen05b_layers --ps_lookup_tree $T/tree_lookup_decoded.json:8 \
    --max_new_tokens 1024 \
    --methods ar,parallelspec_lookup,parallelspec_lookup_v32768 \
    --out_dir $K/full ) > $K/full.log 2>&1
stamp full
