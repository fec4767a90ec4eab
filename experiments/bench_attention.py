"""A decode step's time against the cache size, with attention written as multiply-and-sum (psjax's
default in front of the XLA forms, up to `llama.multiply_sum_pairs` queries x cache slots) and
as matmuls (`--multiply_sum_pairs 0`; `--matmul_attention einsum,cudnn` also times the matmul
form as one fused cuDNN kernel; `--gemm_min_rows 1,2` times one-row projections as XLA's
reductions and as two-row GEMMs): issue 2's
"find where the time between kernels goes". With --chains, also a speculative step verifying
N + 1 queries (a prompt-lookup chain of N drafts: the verify cost, whatever is accepted).

Random bfloat16 weights of a real shape (the cost of a step does not depend on the values),
--batch_sizes rows, a prompt of each --contexts length, 256 new tokens (so 768 and 2,304 cache
slots for 512 and 2,048); the step is psjax's autoregressive loop less its prompt pass
(`psjax.bench.limits.ar_step_seconds`). On the GPU (nothing to carry), from the repository root:

    PYTHONPATH=. python3 experiments/bench_attention.py --out /tmp/out/attention.json

CPU smoke test: `--shape smollm2-135m --contexts 16 --new_tokens 8`.
"""

from __future__ import annotations

import itertools
import json
import sys

from absl import app, flags
import jax
import numpy as np

from psjax.bench import limits
from psjax.bench.timing import run_header
from psjax.decoding.tree import Tree
from psjax.drafters.prompt_lookup import PromptLookup
from psjax.models import llama
from psjax.models.target import random_target

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "qwen2.5-0.5b", f"one of {sorted(limits.SHAPES)}")
flags.DEFINE_list("contexts", ["2048", "512"], "prompt lengths (tokens already in the cache)")
flags.DEFINE_list("multiply_sum_pairs", ["1000000", "0"], "llama.MULTIPLY_SUM_PAIRS values to "
                  "compare (0: matmuls; the recorded runs' few_queries 64 = 1000000 here)")
flags.DEFINE_integer("multiply_sum_queries", 64, "llama.MULTIPLY_SUM_QUERIES: queries a row "
                     "up to which --multiply_sum_pairs applies (64: every chain, as in the "
                     "recorded runs; psjax's default is 1)")
flags.DEFINE_list("matmul_attention", [llama.MATMUL_ATTENTION], "llama.MATMUL_ATTENTION "
                  f"values to compare {llama.MATMUL_ATTENTION_FORMS}: how the matmul form runs")
flags.DEFINE_list("gemm_min_rows", ["0"], "llama.GEMM_MIN_ROWS values (for this backend) to "
                  "compare (1: one-row products left to XLA, which makes them reductions; 0: "
                  "llama's default for this backend)")
flags.DEFINE_list("gemm_pad_min_weights", [str(llama.GEMM_PAD_MIN_WEIGHTS)],
                  "llama.GEMM_PAD_MIN_WEIGHTS values to compare (0: every one-row product)")
flags.DEFINE_list("chains", ["0"], "draft chain lengths N; 0 = the autoregressive step")
flags.DEFINE_list("batch_sizes", ["1"], "rows per step")
flags.DEFINE_integer("new_tokens", 256, "tokens generated per timed run")
flags.DEFINE_string("out", "", "JSON file for the results (optional)")


def main(argv):
    del argv
    target = random_target(limits.shape_config(FLAGS.shape), dtype="bfloat16", fused=True)
    results = {**run_header(), "shape": FLAGS.shape,
               "new_tokens": FLAGS.new_tokens, "command": " ".join(sys.argv), "ar_ms": {},
               "spec_ms": {}}
    for batch, context in itertools.product(map(int, FLAGS.batch_sizes),
                                            map(int, FLAGS.contexts)):
        prompts = np.random.default_rng(0).integers(0, 1000, (batch, context)).tolist()
        for pairs, kernel, rows, weights in itertools.product(
                map(int, FLAGS.multiply_sum_pairs), FLAGS.matmul_attention,
                map(int, FLAGS.gemm_min_rows), map(int, FLAGS.gemm_pad_min_weights)):
            knobs = dict(multiply_sum_pairs=pairs, multiply_sum_queries=FLAGS.multiply_sum_queries,
                         matmul_attention=kernel, gemm_pad_min_weights=weights)
            if rows:  # 0: llama's default for this backend
                knobs["gemm_min_rows"] = rows
            setting = f"batch {batch}, context {context}, multiply_sum_pairs {pairs}, " \
                      f"matmul_attention {llama.matmul_attention_form(kernel)}, " \
                      f"gemm_min_rows {rows}, " \
                      f"gemm_pad_min_weights {weights}"
            with llama.numerics_as(**knobs):
                jax.clear_caches()  # the module is unchanged: recompile under the new setting
                time_setting(target, prompts, setting, results)
            if FLAGS.out:  # after every setting: a run cut short keeps what it measured
                with open(FLAGS.out, "w") as f:
                    json.dump(results, f, indent=1)


def time_setting(target, prompts, setting: str, results: dict) -> None:
    """The step times of --chains under the knobs in force, into `results`."""
    try:  # a kernel this card or cuDNN lacks is recorded, and the others still run
        prefill = limits.prefill_seconds(target.module, target.params, prompts)
        for chain in map(int, FLAGS.chains):
            if chain == 0:
                ms = 1e3 * limits.ar_step_seconds(
                    target.module, target.params, prompts, new_tokens=FLAGS.new_tokens,
                    prefill=prefill)
                results["ar_ms"][setting] = ms
            else:
                ms = 1e3 * limits.spec_step_seconds(
                    target.module, target.params, prompts, PromptLookup(), None,
                    Tree.chain(chain), new_tokens=FLAGS.new_tokens, prefill=prefill)
                results["spec_ms"][f"{setting}, chain {chain}"] = ms
            print(f"{setting}, chain {chain}: step {ms:.3f} ms", flush=True)
    except Exception as e:  # pylint: disable=broad-except
        results.setdefault("errors", {})[setting] = f"{type(e).__name__}: {e}"[:2000]
        print(f"{setting}: {type(e).__name__}: {e}"[:2000], flush=True)


if __name__ == "__main__":
    app.run(main)
