#!/usr/bin/env bash
# Batch 8: why the stacked cache gained nothing there. Traces of lk8_8, cfd9f4c (base) and
# 49d865f (stacked), copies of psjax/ under .carry/SIDE/.
set -uo pipefail
K=/tmp/keep
mkdir -p $K
P=results/profile_h200_batch8_temperature1/probe_b8.py
for side in base stacked; do
  R=/tmp/ab_$side; rm -rf $R; mkdir -p $R/results $R/$(dirname $P)
  cp -r results/tree_design_lookup_qwen05b_cpu $R/results/; cp $P $R/$P
  cp -r .carry/$side/psjax $R/
done
for side in stacked base; do
  ( cd /tmp/ab_$side && PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
      CASES=lk8_8 TRACE=1 timeout 200 python3 $P $K/trace8_$side.json ) > $K/trace8_$side.log 2>&1
  date -u +%T > $K/trace8_$side.done
done
