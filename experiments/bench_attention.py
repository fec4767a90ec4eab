"""A decode step's time against the cache size, with attention written as multiply-and-sum (psjax's
default for up to `llama.FEW_QUERIES` queries) and as matmuls (`--few_queries 0`): issue 2's
"find where the time between kernels goes".

Random bfloat16 weights of a real shape (the cost of a step does not depend on the values),
batch 1, a prompt of each --contexts length, 256 new tokens (so 768 and 2,304 cache slots for
512 and 2,048); the step is psjax's autoregressive loop less its prompt pass
(`psjax.bench.limits.ar_step_seconds`). On the GPU (nothing to carry), from the repository root:

    PYTHONPATH=. python3 experiments/bench_attention.py --out /tmp/out/attention.json

CPU smoke test: `--shape smollm2-135m --contexts 16 --new_tokens 8`.
"""

from __future__ import annotations

import json
import sys

from absl import app, flags
import jax
import numpy as np

from psjax.bench import limits
from psjax.bench.timing import card
from psjax.models import llama
from psjax.models.target import random_target

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "qwen2.5-0.5b", f"one of {sorted(limits.SHAPES)}")
flags.DEFINE_list("contexts", ["2048", "512"], "prompt lengths (tokens already in the cache)")
flags.DEFINE_list("few_queries", ["64", "0"], "llama.FEW_QUERIES values to compare (0: matmuls)")
flags.DEFINE_integer("new_tokens", 256, "tokens generated per timed run")
flags.DEFINE_string("out", "", "JSON file for the results (optional)")


def main(argv):
    del argv
    target = random_target(limits.shape_config(FLAGS.shape), dtype="bfloat16", fused=True)
    results = {"card": card(), "jax": jax.__version__, "shape": FLAGS.shape,
               "new_tokens": FLAGS.new_tokens, "command": " ".join(sys.argv), "ar_ms": {}}
    for context in map(int, FLAGS.contexts):
        prompts = np.random.default_rng(0).integers(0, 1000, (1, context)).tolist()
        prefill = limits.prefill_seconds(target.module, target.params, prompts)
        for few in map(int, FLAGS.few_queries):
            llama.FEW_QUERIES = few
            jax.clear_caches()  # the module is unchanged: recompile under the new setting
            ms = 1e3 * limits.ar_step_seconds(target.module, target.params, prompts,
                                              new_tokens=FLAGS.new_tokens, prefill=prefill)
            results["ar_ms"][f"context {context}, few_queries {few}"] = ms
            print(f"context {context} few_queries {few}: AR step {ms:.3f} ms", flush=True)
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
