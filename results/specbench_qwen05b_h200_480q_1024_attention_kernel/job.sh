#!/usr/bin/env bash
# Next session, with the model (after job13's A/B and `gpu_pipeline.sh models`): the protocol
# (480 questions x 1,024 tokens) with the Pallas verify attention (HEAD's GPU default), then
# temperature 1 on 18 questions with the sampling-fitted trees against the greedy-fitted one.
# Start by hand: setsid nohup bash .carry/job14.sh > /tmp/keep/job14.log 2>&1 < /dev/null &
set -uo pipefail
K=/tmp/keep R=/tmp/jobrepo14
mkdir -p $K && rm -rf $R && mkdir -p $R && cp -r psjax experiments launch results setup.py $R/
rm -rf /tmp/drafter && cp -r .carry/drafter_qwen05b_layers /tmp/drafter
cd $R
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
stamp() { date -u +%T > $K/$1.done; }
for ((i = 0; i < 200; i++)); do [[ -e /tmp/models.done && -e $K/inplace.done ]] && break; sleep 5; done
T=results/tree_design_lookup_qwen05b_cpu
E="python3 experiments/eval_specbench.py --target /tmp/models/qwen05b --questions /tmp/spec_bench.jsonl
   --prompt_width 512,2048 --text diverged --drafter /tmp/drafter"
( time timeout 720 $E --ps_lookup_tree $T/tree_lookup_decoded.json:8 --max_new_tokens 1024 \
    --methods ar,parallelspec_lookup --out_dir $K/full ) > $K/full.log 2>&1
stamp full
( time timeout 300 $E --ps_lookup_tree $T/tree_lookup_t1.json:8 --max_new_tokens 256 --limit 3 \
    --temperature 1 --methods ar,parallelspec_lookup_n8,parallelspec_lookup_n16 --out_dir $K/t18 ) > $K/t18.log 2>&1
stamp t18
( time timeout 300 $E --ps_lookup_tree $T/tree_lookup_decoded.json:16 --max_new_tokens 256 --limit 3 \
    --temperature 1 --methods ar,parallelspec_lookup_n16 --out_dir $K/t18g ) > $K/t18g.log 2>&1
stamp t18g
