"""Which numerics make a verify pass compute what one-token steps compute? (issue 3)

For each --configs entry (the knobs `llama.numerics()` names, e.g. every product padded to 16
rows and the attention kernel's tiles to 64 query rows), `psjax.bench.exactness.compare`:
greedy one-token steps, then the same tokens again as verify passes of --t tokens laid out as a
chain and as a tree; per layout, positions with bitwise-equal logits, the same argmax, and the
largest difference. Exact arithmetic there is what 0 bfloat16 mismatches needs.

Random weights of a real shape (nothing to carry: bitwise equality does not depend on the
weights' values) or a real --target (then the prompt is a Spec-Bench question through its chat
template). On the GPU, from the repository root:

    PYTHONPATH=.:/tmp/site python3 experiments/probe_exactness.py --out /tmp/out/exactness.json \\
        --configs 'default;gemm_min_rows=16,gemm_pad_min_weights=0;gemm_min_rows=16,gemm_pad_min_weights=0,kernel_min_rows=64'

`--step_rows 9` runs each one-token step as a 9-row pass (the token and 8 copies), the shapes of
the verify pass, as `autoregressive.generate(step_rows=9)` does.

CPU smoke run: `--shape smollm2-135m --prompt_tokens 16 --new_tokens 18 --configs default`.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
import jax
import numpy as np

from psjax.bench import exactness, limits
from psjax.bench.timing import run_header
from psjax.data import spec_bench
from psjax.models import llama
from psjax.models.target import load_target, random_target

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "qwen2.5-0.5b", f"random weights of one of {sorted(limits.SHAPES)}")
flags.DEFINE_string("target", "", "a real model instead (registry name or HF directory)")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and compute dtype")
flags.DEFINE_integer("prompt_tokens", 512, "random weights: a prompt of this many random tokens")
flags.DEFINE_string("questions", spec_bench.DEFAULT_PATH, "--target: the prompt is the first "
                    "question's first turn")
flags.DEFINE_integer("new_tokens", 252, "greedy tokens compared (whole verify passes of --t)")
flags.DEFINE_integer("t", 9, "path tokens a verify pass (9: an 8-node chain and its bonus)")
flags.DEFINE_integer("step_rows", 1, "each one-token step a pass of this many rows, the token "
                     "in the first (--t: the verify pass's shapes)", lower_bound=1)
flags.DEFINE_string("configs", "default", "';'-separated settings, each 'default' or "
                    "'knob=value,...' with llama.numerics()'s knob names")
flags.DEFINE_string("out", "", "JSON file for the results (optional)")


def parse_config(text: str) -> dict:
    """'default' -> {}; 'gemm_min_rows=16,kernel_min_rows=64' -> {name: value}."""
    if text.strip() == "default":
        return {}
    knobs = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        if not sep:
            raise app.UsageError(f"--configs entry {text!r}: {item!r} is not knob=value")
        knobs[name.strip()] = value.strip()
    return knobs


def main(argv):
    del argv
    configs = [(text, parse_config(text)) for text in FLAGS.configs.split(";") if text.strip()]
    for text, knobs in configs:  # every entry checked before the first compiles
        try:
            with llama.numerics_as(**knobs):
                pass
        except ValueError as e:
            raise app.UsageError(f"--configs entry {text!r}: {e}")
    if FLAGS.target:
        target = load_target(FLAGS.target, dtype=FLAGS.dtype)
        prompt = target.chat_prompt(spec_bench.first_turns(FLAGS.questions, 1)[0])
    else:
        target = random_target(limits.shape_config(FLAGS.shape), dtype=FLAGS.dtype, fused=True)
        prompt = np.random.default_rng(0).integers(0, 1000, FLAGS.prompt_tokens).tolist()
    results = {**run_header(), "target": FLAGS.target or f"random {FLAGS.shape}",
               "dtype": FLAGS.dtype, "command": " ".join(sys.argv), "configs": {}}
    for text, knobs in configs:
        with llama.numerics_as(**knobs):
            jax.clear_caches()  # the module is unchanged: retrace under these knobs
            row = {"numerics": llama.numerics(), **exactness.compare(
                target.module, target.params, prompt, FLAGS.new_tokens, FLAGS.t,
                step_rows=FLAGS.step_rows)}
        results["configs"][text] = row
        print(text, json.dumps({k: row[k] for k in exactness.LAYOUTS}), flush=True)
        if FLAGS.out:  # after every setting: a run cut short keeps what it measured
            with open(FLAGS.out, "w") as f:
                json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
