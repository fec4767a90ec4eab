#!/usr/bin/env bash
# Verify attention as one Pallas kernel ("pallas") against the chunked XLA form, random weights
# (no model), on d5f24b7, after `launch/gpu_pipeline.sh setup`; 2026-12-01 on an H200.
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
P=results/profile_h200_batch8_temperature1/probe_b8.py
for form in pallas chunked; do
  ( CASES=lk8_1,lk8_8 TRACE=1 timeout 240 python3 -c "import runpy; from psjax.models import llama
llama.MATMUL_ATTENTION = '$form'; runpy.run_path('$P', run_name='__main__')" $K/probe_$form.json ) > $K/probe_$form.log 2>&1
  date -u +%T > $K/probe_$form.done
done
( timeout 400 python3 experiments/bench_attention.py --matmul_attention chunked,pallas \
    --multiply_sum_pairs 1000000 --multiply_sum_queries 1 --chains 8,16 --batch_sizes 1,8 \
    --contexts 512,2048 --out $K/attention.json ) > $K/attention.log 2>&1
date -u +%T > $K/attention.done
