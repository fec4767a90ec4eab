#!/usr/bin/env bash
# The GPU runs behind the README's numbers, stage by stage, on one lent GPU machine that has no
# package index and no model hub (see ../shared/docs/GPU.md): each stage is one call; /tmp keeps
# what earlier stages left while the machine stays up.
#
#   launch/gpu_pipeline.sh split NAME            HERE, not there (PYTHON=.venv/bin/python): the
#                                                registry model NAME (smol, qwen05, qwen15) cut
#                                                into .up/NAME.partNN.d/, 24 MiB each (a carry is
#                                                64 MiB with the working tree, ~27 MB in 2026-12)
#   launch/gpu_pipeline.sh wheels                HERE, not there (PYTHON=.venv/bin/python): the
#                                                packages psjax needs that the GPU image lacks,
#                                                as Python 3.12 wheels at this venv's versions,
#                                                and the Spec-Bench questions, into .whl/
#   launch/gpu_pipeline.sh prompts               HERE, not there: the ShareGPT conversations cut
#                                                to their first 4 user turns (what distill
#                                                answers), gzipped into .whl/ for setup
#   launch/gpu_pipeline.sh setup                 wheels from .whl/ -> /tmp/site, versions, card
#   launch/gpu_pipeline.sh piece DIR             copies the carried piece .up/DIR/ to /tmp/stage
#                                                (only that one: a warm machine keeps earlier
#                                                carries), one call per piece, then `models`
#   launch/gpu_pipeline.sh models                joins, checks and converts the GGUF files
#   launch/gpu_pipeline.sh bench_ar MODEL        psjax vs transformers autoregressive tokens/s
#   launch/gpu_pipeline.sh limits                floor, step times at 0.5B-13B shapes, projection
#   launch/gpu_pipeline.sh profile [ARGS]        where a step's time goes at the 0.5B shape: AR and
#                                                speculative steps traced, split by phase
#   launch/gpu_pipeline.sh bench_train [ARGS]    the drafter's train step at the 0.5B shapes
#                                                (random weights: no model needed), steps/s, MFU;
#                                                --profile splits it by phase
#   launch/gpu_pipeline.sh grid MODEL DRAFTER     batch x temperature throughput of each method
#   launch/gpu_pipeline.sh evaluate MODEL DRAFTER NAME [ARGS]   a drafter's trees fitted on
#                                                Spec-Bench (design_tree), then Spec-Bench
#                                                through the engine with its TREE_NODES-node
#                                                tree (default 16) beside ar, prompt lookup and
#                                                transformers (METHODS, LIMIT questions a
#                                                category, default 3): $OUT/eval_NAME/;
#                                                LOOKUP_DEPTH=D also fits trees with prompt
#                                                lookup in front (drafting D deep) and runs
#                                                parallelspec_lookup (LOOKUP_NODES nodes)
#   launch/gpu_pipeline.sh distill MODEL N       self-distilled answers to N ShareGPT prompts (up
#                                                to 4 turns each), packed into $OUT to keep;
#                                                GPUS=G splits them among G GPUs (one process
#                                                each), then joins them; KIND=NAME (default
#                                                distilled) keeps another answer set apart, e.g.
#                                                KIND=sampled ... --temperature 0.7 --seed 1,
#                                                or KIND=long ... --min_prompt_tokens 385
#                                                --max_prompt_tokens 1024 --prompt_width 1024
#   launch/gpu_pipeline.sh distill_tasks MODEL N self-distilled answers to N BIG-bench task prompts
#                                                (psjax.data.bigbench; the task files carried as
#                                                .whl/bigbench/), packed into $OUT/tasks_MODEL
#   launch/gpu_pipeline.sh pack SRC DEST         a JSONL shard directory packed as distill does
#                                                (here, e.g. raw conversations: generate_data.py
#                                                --answers conversation, then pack into
#                                                .whl/conversation_MODEL)
#   launch/gpu_pipeline.sh unpack MODEL [KIND]   a kept pack, carried as .whl/KIND_MODEL/ (KIND:
#                                                distilled, the default, conversation or tasks), back
#                                                to /tmp/KIND/MODEL (no distill run)
#   launch/gpu_pipeline.sh train MODEL VARIANT [--config.x=y ...]   drafter training + export
#                                                + its draft vocabulary (RUN=NAME: its own
#                                                workdir and export)
#   DRY_RUN=1 launch/gpu_pipeline.sh STAGE ...   prints the commands instead of running them
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=".:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false \
       JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
OUT=${OUT:-/tmp/out}
run() { if [[ -n "${DRY_RUN:-}" ]]; then echo "+ $*"; else "$@"; fi; }
# Token ids only (the texts decode from them) of JSONL shard directories (pack SRC... DEST),
# gzipped in 15 MB pieces: what comes back from $OUT, and what `unpack` reads.
pack() {
  local dest=${*: -1} sources=("${@:1:$#-1}")
  mkdir -p "$dest"
  for src in "${sources[@]}"; do cat "$src"/shard-*.jsonl; done | python3 -c 'import json, sys
for line in sys.stdin:
    r = json.loads(line)
    print(json.dumps({k: r[k] for k in ("id", "prompt_tokens", "answer_tokens", "finished")}))' \
    | gzip | split -b 15M - "$dest/ids.jsonl.gz.part"
}
unpack() {  # unpack MODEL KIND [DIR]: a pack in DIR/KIND_MODEL (default .whl) -> /tmp/KIND/MODEL
  mkdir -p "/tmp/$2/$1"
  cat "${3:-.whl}/$2_$1"/ids.jsonl.gz.part* | gunzip > "/tmp/$2/$1/shard-00000.jsonl"
}
# The target answers N prompts into /tmp/KIND/MODEL, packed into $OUT/KIND_MODEL (what
# `unpack MODEL KIND` reads back). TIME_LIMIT=S stops it after S seconds: resumable, and the
# batches run in random order, so what is done is a fair sample. GPUS=G: G processes, one a
# GPU, each answering every G-th prompt into /tmp/KIND/MODEL.partI; the pack joins them and
# is unpacked into /tmp/KIND/MODEL.
self_distill() {
  local kind=$1 model=$2 n=$3 gpus=${GPUS:-1}; shift 3
  for ((i = 0; i < gpus; i++)); do
    run env CUDA_VISIBLE_DEVICES=$i timeout "${TIME_LIMIT:-0}" python3 \
        experiments/generate_data.py --target "/tmp/models/$model" --dtype bfloat16 \
        --num_prompts "$n" --num_shards "$gpus" --shard_index "$i" \
        --batch_size 128 --max_new_tokens 512 --max_prompt_tokens 384 --prompt_width 384 \
        --out_dir "/tmp/$kind/$model.part$i" --data_dir '' "$@" &
  done
  run wait || true
  run pack $(for ((i = 0; i < gpus; i++)); do echo "/tmp/$kind/$model.part$i"; done) \
      "$OUT/${kind}_$model"
  run unpack "$model" "$kind" "$OUT"
}
# What psjax imports that the GPU machine's image does not have (setup checks them there).
MISSING_THERE=(gguf ml_collections tensorboardX)
declare -A GGUF_SHA=(
  [smol]=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
  [qwen05]=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  [qwen15]=cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046
)
declare -A MODEL_OF=([smol]=smollm2 [qwen05]=qwen05b [qwen15]=qwen15b)
declare -A REGISTRY_OF=([smol]=smollm2-135m-instruct [qwen05]=qwen2.5-coder-0.5b-instruct
                        [qwen15]=qwen2.5-coder-1.5b-instruct)

stage=${1:?stage}; shift
case $stage in
  split)
    name=${1:?split NAME: smol, qwen05 or qwen15}
    [[ -n ${REGISTRY_OF[$name]:-} ]] || { echo "split: unknown model $name" >&2; exit 2; }
    # The registry prints the converted directory last; model.gguf sits beside it.
    run bash -c "rm -rf .up/$name.part* && mkdir -p .up && \
dir=\$(${PYTHON:-python3} -m psjax.convert.registry --model ${REGISTRY_OF[$name]} | tail -n 1) && \
split -b 24M -d -a 2 \"\$(dirname \"\$dir\")/model.gguf\" .up/$name.part && \
for p in .up/$name.part??; do mkdir -p \$p.d && mv \$p \$p.d/; done && ls -d .up/$name.part*.d" ;;
  wheels)
    run mkdir -p .whl
    for pkg in "${MISSING_THERE[@]}"; do
      version=$(${PYTHON:-python3} -m pip show "$pkg" | awk '/^Version:/ {print $2}')
      [[ -n $version ]] || { echo "wheels: $pkg is not installed here (make venv)" >&2; exit 2; }
      run python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
          --implementation cp --platform manylinux2014_x86_64 -d .whl "$pkg==$version"
    done
    run cp ../shared/data/spec_bench/question.jsonl .whl/ ;;
  setup)
    run python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    # ShareGPT conversations cut to the turns distill answers (up to 4 user turns; 24 MB
    # gzipped), written here by the `prompts` stage.
    run cp .whl/sharegpt_prompts.json.gz /tmp/ 2>/dev/null || true
    run cp .whl/question.jsonl /tmp/spec_bench.jsonl  # ../shared does not travel
    # BIG-bench task files (psjax.data.bigbench.fetch()'s directory), for distill_tasks.
    [[ -d .whl/bigbench ]] && run cp -r .whl/bigbench /tmp/bigbench
    run nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
    run python3 -c "import jax, flax, optax, orbax.checkpoint as o, transformers, torch; \
print(jax.__version__, flax.__version__, optax.__version__, transformers.__version__, \
torch.__version__, jax.devices())"
    for pkg in "${MISSING_THERE[@]}"; do
      run python3 -c "import $pkg" 2>/dev/null || {
        echo "setup: $pkg is missing: run launch/gpu_pipeline.sh wheels here, carry .whl" >&2
        exit 1; }
    done ;;
  piece)
    run mkdir -p /tmp/stage
    run cp ".up/${1:?piece directory under .up/}"/* /tmp/stage/ ;;
  models)
    for name in "${!GGUF_SHA[@]}"; do
      ls /tmp/stage/"$name".part* >/dev/null 2>&1 || continue
      [[ -d /tmp/models/${MODEL_OF[$name]} ]] && continue
      run bash -c "cat /tmp/stage/$name.part* > /tmp/$name.gguf"
      run python3 -m psjax.convert.registry --gguf "/tmp/$name.gguf" \
          --out "/tmp/models/${MODEL_OF[$name]}" --sha256 "${GGUF_SHA[$name]}" --dtype bfloat16
    done ;;
  bench_ar)
    model=$1; shift
    run python3 experiments/bench_decode.py --model "/tmp/models/$model" \
        --questions /tmp/spec_bench.jsonl --out "$OUT/bench_ar_$model.json" "$@" ;;
  limits)
    run python3 experiments/bench_limits.py --out "$OUT/limits.json" "$@" ;;
  profile)
    # The phase split reads the HLO XLA dumps as it compiles: no compilation cache here.
    run env -u JAX_COMPILATION_CACHE_DIR \
        XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*_generate.*" \
        python3 experiments/bench_limits.py --shapes qwen2.5-0.5b \
        --profile_shape qwen2.5-0.5b --xla_variants '' --xla_dump_dir /tmp/hlo \
        --out "$OUT/profile.json" "$@" ;;
  bench_train)
    run python3 experiments/bench_train.py --shape qwen2.5-0.5b --out "$OUT/bench_train.json" \
        "$@" ;;
  grid)
    model=$1 drafter=$2; shift 2
    run python3 experiments/bench_grid.py --target "/tmp/models/$model" --drafter "$drafter" \
        --questions /tmp/spec_bench.jsonl --out "$OUT/grid_$model.json" "$@" ;;
  evaluate)
    model=$1 drafter=$2 dir=$OUT/eval_$3; shift 3
    methods=${METHODS:-ar,pld,parallelspec_k2,parallelspec_tree,hf_static_compiled}
    lookup=()
    run mkdir -p "$dir"
    design() {
      run python3 experiments/design_tree.py --target "/tmp/models/$model" \
          --questions /tmp/spec_bench.jsonl --per_category 2 --max_prompt_tokens 768 \
          --max_new_tokens 96 --num_nodes 8,16,32,44,64 --drafter "$drafter" "$@"
    }
    design --out "$dir/tree.json"
    if [[ -n ${LOOKUP_DEPTH:-} ]]; then  # prompt lookup in front, drafting this deep
      design --lookup_depth "$LOOKUP_DEPTH" --out "$dir/tree_lookup.json"
      methods+=,parallelspec_lookup
      lookup=(--ps_lookup_tree "$dir/tree_lookup.json:${LOOKUP_NODES:-${TREE_NODES:-16}}")
    fi
    run python3 experiments/eval_specbench.py --target "/tmp/models/$model" \
        --questions /tmp/spec_bench.jsonl --limit "${LIMIT:-3}" --max_new_tokens 256 \
        --prompt_width 512,2048 --text diverged --drafter "$drafter" --methods "$methods" \
        --ps_tree "$dir/tree.json:${TREE_NODES:-16}" "${lookup[@]}" --out_dir "$dir" "$@" ;;
  distill)
    model=$1 n=$2; shift 2
    self_distill "${KIND:-distilled}" "$model" "$n" \
        --sharegpt /tmp/sharegpt_prompts.json.gz --max_turns 4 "$@" ;;
  distill_tasks)
    model=$1 n=$2; shift 2
    self_distill tasks "$model" "$n" --prompts bigbench --bigbench /tmp/bigbench "$@" ;;
  pack)
    run pack "$@" ;;
  prompts)
    run python3 -c 'import gzip, json
from psjax.data import sharegpt
# Up to 4 user turns and their replies after a leading system turn: what distill answers.
cut = [dict(r, conversations=r.get("conversations", [])[:9])
       for r in sharegpt.iter_conversations()]
with gzip.open(".whl/sharegpt_prompts.json.gz", "wt") as f:
    json.dump(cut, f)
print(len(cut), "conversations")' ;;
  unpack)
    run unpack "$1" "${2:-distilled}" ;;
  train)
    model=$1 variant=$2; shift 2
    # TIME_LIMIT=S stops training after S seconds; the export takes the last checkpoint.
    # RUN=NAME keeps runs of one variant apart (an A/B in one call): workdir, export, metrics.
    # The export gets its draft vocabulary ranked from the data it trained on (draft_vocab.py).
    name=$model-$variant${RUN:+-$RUN} data=/tmp/distilled/$model
    for arg in "$@"; do [[ $arg == --config.data.jsonl_dir=* ]] && data=${arg#*=}; done
    run timeout "${TIME_LIMIT:-0}" python3 experiments/train_drafter.py \
        --config "experiments/configs/parallelspec.py:$variant" \
        --config.target="/tmp/models/$model" --config.data.source=jsonl \
        --config.data.jsonl_dir="$data" --config.spec_bench=/tmp/spec_bench.jsonl \
        --workdir "/tmp/work/$name" \
        --alsologtostderr "$@" || true
    run mkdir -p "$OUT"
    run cp "/tmp/work/$name/metrics.jsonl" "$OUT/train_metrics_$name.jsonl"
    drafter=$OUT/drafter_$model${RUN:+_$RUN}
    run python3 experiments/export_hf.py --workdir "/tmp/work/$name" \
        --out "$drafter" --dtype bfloat16 --max_shard_mb 15
    run python3 experiments/draft_vocab.py --data "$data" --drafter "$drafter" \
        --out "$OUT/draft_vocab_$name.json" ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
