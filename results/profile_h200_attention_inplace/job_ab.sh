#!/usr/bin/env bash
# Next session, random weights (no model): the Pallas kernel reading the stacked cache in place
# (.carry/inplace_operand.diff; files in .carry/inplace/) against HEAD. After setup:
# JOB=job13.sh bash .carry/poll.sh inplace.done 60 (carry .carry).
set -uo pipefail
K=/tmp/keep
mkdir -p $K
P=results/profile_h200_batch8_temperature1/probe_b8.py
for side in head inplace; do
  R=/tmp/ab_$side; rm -rf $R; mkdir -p $R && cp -r psjax results setup.py $R/
  [[ $side == inplace ]] && cp .carry/inplace/psjax/models/*.py $R/psjax/models/
done
# Traced (kernels, phases), then untraced walls twice, the versions alternating.
for run in inplace:1 head:1 inplace:0 head:0 inplace:0 head:0; do
  side=${run%:*} trace=${run#*:}
  ( cd /tmp/ab_$side && PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
      CASES=lk8_1,lk8_8 env $( ((trace)) && echo TRACE=1 ) timeout 200 python3 $P $K/probe_${side}_t${trace}_$(date +%s).json ) >> $K/$side.log 2>&1
done
date -u +%T > $K/inplace.done
