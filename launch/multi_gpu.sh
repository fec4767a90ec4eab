#!/usr/bin/env bash
# Drafter training on one host with several GPUs (one process sees them all; the mesh spreads
# the run over them).
#
#   launch/multi_gpu.sh VARIANT WORKDIR [--config.x=y ...]
#   e.g. launch/multi_gpu.sh smollm2 workdir/ps_smollm2 --config.batch_size=64
#   MESH="(2,-1,1)"  data,fsdp,tensor axes (-1 = the rest); default "(1,NGPU,1)": all-FSDP
#   NGPU=4           GPUs to use (default: all nvidia-smi lists); sets CUDA_VISIBLE_DEVICES
#   PYTHON=python3   interpreter;  DRY_RUN=1 prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
variant=${1:?usage: launch/multi_gpu.sh VARIANT WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/multi_gpu.sh VARIANT WORKDIR [--config.x=y ...]}; shift 2
NGPU=${NGPU:-$( (nvidia-smi -L 2>/dev/null || true) | wc -l)}
(( NGPU > 0 )) || NGPU=1
MESH=${MESH:-"(1,$NGPU,1)"}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "+ $*"; else "$@"; fi; }
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
       XLA_PYTHON_CLIENT_PREALLOCATE=false \
       CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-$(seq -s, 0 $((NGPU - 1)))}
if [[ -n "${DRY_RUN:-}" ]]; then echo "+ export CUDA_VISIBLE_DEVICES=$CUDA_VISIBLE_DEVICES"; fi
run "${PYTHON:-python3}" experiments/train_drafter.py \
    --config "experiments/configs/parallelspec.py:$variant" --config.mesh="$MESH" \
    --config.num_devices="$NGPU" --workdir "$workdir" --alsologtostderr "$@"
