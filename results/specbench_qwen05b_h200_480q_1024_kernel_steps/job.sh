#!/usr/bin/env bash
# Next session (after setup and `gpu_pipeline.sh models`), HEAD's code (one-token steps through
# the kernel by default, attention_kernel.MIN_QUERY_ROWS), in priority order:
# (1) issue 3's exactness probe: every product padded to 16 rows, the kernel's query rows to 64,
#     one-token steps through the kernel (the default now): divergences of pld (a chain of 8: 9
#     queries, 63 kernel rows, slots in depth order) and the lookup tree (8 nodes) against 3 / 1
#     in (16)'s probe with 16-row kernel tiles;
# (2) issue 2's benchmark against transformers (256 tokens exactly, batch 1 and 8) now that
#     one-token steps go through the kernel (899.8 tok/s, 2.63x before);
# (3) the greedy protocol with the new autoregressive baseline; (4) the grid, batch 8 / 32
#     greedy (batch 8's one-token steps now through the kernel); (5) temperature 1 protocol.
# Start by hand (carry .carry/job16.sh, .carry/drafter_qwen05b_layers, .carry/poll.sh):
#   mkdir -p /tmp/keep; touch /tmp/keep/started; setsid nohup bash .carry/job16.sh > /tmp/keep/job16.log 2>&1 < /dev/null &
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo16
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
rm -rf /tmp/drafter && cp -r .carry/drafter_qwen05b_layers /tmp/drafter
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 200; i++)); do [[ -e /tmp/models.done ]] && break; sleep 5; done
T=results/tree_design_lookup_qwen05b_cpu
E="python3 experiments/eval_specbench.py --target /tmp/models/qwen05b --questions /tmp/spec_bench.jsonl
   --prompt_width 512,2048 --text diverged --drafter /tmp/drafter"
( time timeout 300 $E --ps_lookup_tree $T/tree_lookup_decoded.json:8 --max_new_tokens 256 --limit 3 \
    --methods ar,pld,parallelspec_lookup --pld_k 8 --gemm_min_rows 16 --gemm_pad_min_weights 0 \
    --kernel_min_rows 64 --out_dir $K/exact64 ) > $K/exact64.log 2>&1
stamp exact64
( time timeout 400 python3 experiments/bench_decode.py --model /tmp/models/qwen05b \
    --questions /tmp/spec_bench.jsonl --methods psjax_ar,hf_static_compiled \
    --out $K/bench_ar_qwen05b.json ) > $K/bench_ar.log 2>&1
stamp bench_ar
( time timeout 590 $E --ps_lookup_tree $T/tree_lookup_decoded.json:8 --max_new_tokens 1024 \
    --methods ar,parallelspec_lookup --out_dir $K/full ) > $K/full.log 2>&1
stamp full
( time timeout 300 python3 experiments/bench_grid.py --target /tmp/models/qwen05b --drafter /tmp/drafter \
    --questions /tmp/spec_bench.jsonl --methods ar,pld,parallelspec_lookup_n8 \
    --ps_lookup_tree $T/tree_lookup_decoded.json:8 --batch_sizes 8,32 --temperatures 0 \
    --out $K/grid.json ) > $K/grid.log 2>&1
stamp grid
( time timeout 590 $E --ps_lookup_tree $T/tree_lookup_t1.json:8 --max_new_tokens 1024 --temperature 1 \
    --methods ar,parallelspec_lookup --out_dir $K/t1full ) > $K/t1full.log 2>&1
stamp t1full
