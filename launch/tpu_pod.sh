#!/usr/bin/env bash
# Drafter training on a Cloud TPU pod slice: the same command on every worker (one process per
# host), joined through jax.distributed.initialize() (TPU metadata supplies the topology). The
# repo must already be at REPO_DIR on every worker with its dependencies installed (e.g. a first
# pass with CMD_PREFIX="pip install -e . &&"), and WORKDIR should be a shared
# path (gs://... or a mounted filesystem).
#
#   TPU_NAME=my-pod ZONE=us-central2-b launch/tpu_pod.sh smollm2 gs://bucket/ps_smollm2 [--config.x=y ...]
#   MESH="(1,-1,1)" default (FSDP over every chip);  PROJECT=... optional gcloud project
#   REPO_DIR=~/psjax on the workers;  DRY_RUN=1 prints the gcloud command instead of running it
set -euo pipefail
variant=${1:?usage: launch/tpu_pod.sh VARIANT WORKDIR [--config.x=y ...]}
workdir=${2:?usage: launch/tpu_pod.sh VARIANT WORKDIR [--config.x=y ...]}; shift 2
: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}"
MESH=${MESH:-"(1,-1,1)"}
REPO_DIR=${REPO_DIR:-'~/psjax'}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "+ $*"; else "$@"; fi; }
extra=""; for a in "$@"; do extra+=" $(printf %q "$a")"; done
cmd="cd $REPO_DIR && ${CMD_PREFIX:+$CMD_PREFIX }PYTHONPATH=. PYTHONUNBUFFERED=1 python3 \
experiments/train_drafter.py --distributed --config experiments/configs/parallelspec.py:$variant \
--config.mesh='$MESH' --workdir '$workdir' --alsologtostderr$extra"
run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" ${PROJECT:+--project="$PROJECT"} \
    --worker=all --command="$cmd"
