#!/usr/bin/env bash
# Next session (after setup and `gpu_pipeline.sh models`), in priority order, HEAD's code (the
# in-place kernel): (1) temperature 1 under the protocol (480 x 1,024) with the 8-node
# sampling-fitted tree: the 2x goal; (2) the greedy protocol again (3.04x before the in-place
# change); (3) one-token steps through the kernel (--multiply_sum_pairs 0) against
# multiply-and-sum, 18 questions x 1,024 tokens, autoregressive only, after (3') every product
# padded to 16 rows (divergences: does the verify pass then compute what one-token steps do?);
# (4) the grid, batch 8 and 32, temperature 0 and 1. Start by hand (carry .carry/job15.sh, .carry/drafter_qwen05b_layers):
#   mkdir -p /tmp/keep; setsid nohup bash .carry/job15.sh > /tmp/keep/job15.log 2>&1 < /dev/null &
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo15
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
rm -rf /tmp/drafter && cp -r .carry/drafter_qwen05b_layers /tmp/drafter
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 200; i++)); do [[ -e /tmp/models.done ]] && break; sleep 5; done
T=results/tree_design_lookup_qwen05b_cpu
E="python3 experiments/eval_specbench.py --target /tmp/models/qwen05b --questions /tmp/spec_bench.jsonl
   --prompt_width 512,2048 --text diverged --drafter /tmp/drafter"
( time timeout 590 $E --ps_lookup_tree $T/tree_lookup_t1.json:8 --max_new_tokens 1024 --temperature 1 \
    --methods ar,parallelspec_lookup --out_dir $K/t1full ) > $K/t1full.log 2>&1
stamp t1full
( time timeout 590 $E --ps_lookup_tree $T/tree_lookup_decoded.json:8 --max_new_tokens 1024 \
    --methods ar,parallelspec_lookup --out_dir $K/full ) > $K/full.log 2>&1
stamp full
# Exact arithmetic? Every product padded to 16 rows (one-token steps and 9-token verify passes
# then share GEMM shapes) and one-token steps through the kernel too: divergences against the
# default run of 2026-12-02 (18 q x 256: 3 divergences, 1 mismatch).
( time timeout 240 $E --ps_lookup_tree $T/tree_lookup_decoded.json:8 --max_new_tokens 256 --limit 3 \
    --methods ar,parallelspec_lookup --gemm_min_rows 16 --gemm_pad_min_weights 0 --multiply_sum_pairs 0 \
    --out_dir $K/exact ) > $K/exact.log 2>&1
stamp exact
for pairs in 0 14336 0 14336; do
  ( time timeout 200 $E --max_new_tokens 1024 --limit 3 --methods ar --multiply_sum_pairs $pairs \
      --out_dir $K/ar_pairs${pairs}_$(date +%s) ) >> $K/ar_pairs.log 2>&1
done
stamp ar_pairs
( time timeout 400 python3 experiments/bench_grid.py --target /tmp/models/qwen05b --drafter /tmp/drafter \
    --questions /tmp/spec_bench.jsonl --methods ar,pld,parallelspec_lookup_n8 \
    --ps_lookup_tree $T/tree_lookup_decoded.json:8 --batch_sizes 8,32 --temperatures 0,1 \
    --out $K/grid.json ) > $K/grid.log 2>&1
stamp grid
