#!/usr/bin/env bash
# Call 1: wheels, versions, then the exactness probe in the background (random weights: no upload).
set -uo pipefail
bash launch/gpu_pipeline.sh setup
mkdir -p /tmp/keep && rm -rf /tmp/probe && mkdir -p /tmp/probe && cp -r psjax experiments setup.py /tmp/probe/
cd /tmp/probe
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
setsid nohup bash -c "
( time python3 experiments/probe_exactness.py --step_rows 9 --out /tmp/keep/probe9.json \
  --configs 'default;gemm_min_rows=16,gemm_pad_min_weights=0' ) > /tmp/keep/probe9.log 2>&1
( time python3 experiments/probe_exactness.py --step_rows 16 --t 16 --new_tokens 256 \
  --out /tmp/keep/probe16.json --configs default ) > /tmp/keep/probe16.log 2>&1
date -u +%T > /tmp/keep/probe.done" > /dev/null 2>&1 < /dev/null &
echo started probe
