#!/usr/bin/env bash
# The runs of ../specbench_qwen05b_h200_attention_kernel_18q/, ../grid_qwen05b_h200_lookup_b8_
# attention_kernel/ and ../specbench_qwen05b_h200_temperature1_18q_attention_kernel/, after
# `launch/gpu_pipeline.sh setup` and `models qwen05b`, with the k = 3 layers drafter of "On
# H200s (9)" in /tmp/drafter. They ran on d5f24b7 with MATMUL_ATTENTION set to "pallas", what
# the default "fastest" now picks on a GPU. The first greedy run overlapped the end of
# job_probe_and_attention.sh (first_run_overlapped/); the committed one ran alone, last.
set -uo pipefail
K=/tmp/keep
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
T=results/tree_design_lookup_qwen05b_cpu/tree_lookup_decoded.json
E="python3 experiments/eval_specbench.py --target /tmp/models/qwen05b --questions /tmp/spec_bench.jsonl
   --prompt_width 512,2048 --text diverged --drafter /tmp/drafter --ps_lookup_tree $T:8
   --max_new_tokens 256 --limit 3"
$E --methods ar,pld,parallelspec_lookup_n8,parallelspec_lookup_n16 --out_dir $K/b18
python3 experiments/bench_grid.py --target /tmp/models/qwen05b --drafter /tmp/drafter \
    --questions /tmp/spec_bench.jsonl --methods ar,pld,parallelspec_lookup_n8 \
    --ps_lookup_tree $T:8 --batch_sizes 8 --temperatures 0 --out $K/grid8.json
$E --temperature 1 --methods ar,parallelspec_lookup_n16 --out_dir $K/t18
$E --methods ar,pld,parallelspec_lookup_n8,parallelspec_lookup_n16 --out_dir $K/b18c
