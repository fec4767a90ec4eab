#!/usr/bin/env bash
# A/B/C on random weights (no model): base = cfd9f4c (a cache array per layer), stacked = 49d865f
# (one array for all layers), new = 49d865f + head_major_layout.diff (keys/values [L, B, K, S, H]),
# each side a copy of psjax/ under .carry/SIDE/ (new: the working tree). Wall ms per step, then traces.
set -uo pipefail
K=/tmp/keep
mkdir -p $K
P=results/profile_h200_batch8_temperature1/probe_b8.py
for side in base stacked new; do
  R=/tmp/ab_$side; rm -rf $R; mkdir -p $R/results $R/$(dirname $P)
  cp -r results/tree_design_lookup_qwen05b_cpu $R/results/; cp $P $R/$P
  if [[ $side == new ]]; then cp -r psjax $R/; else cp -r .carry/$side/psjax $R/; fi
done
probe() {  # probe SIDE NAME CASES [TRACE]
  ( cd /tmp/ab_$1 && PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
      CASES=$3 TRACE=${4:-} timeout 300 python3 $P $K/$2.json ) > $K/$2.log 2>&1
  date -u +%T > $K/$2.done
}
for side in base stacked new; do probe $side wall_$side ar1,lk8_1,ar8,lk8_8; done
for side in new base; do probe $side trace_$side lk8_1,ar1 1; done
