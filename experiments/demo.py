"""The main job on an embedded default: SmolLM2-135M-Instruct with the ParallelSpec drafter this
project trained (assets/drafters/), greedy, speculative next to autoregressive.

  python experiments/demo.py                       # what `make demo` runs
  python experiments/demo.py --prompt "..." --max_new_tokens 128 --dtype bfloat16

It prints the answer, tau (tokens per target forward pass) and checks that speculative decoding
produced exactly the autoregressive output.
"""

import os
import time

from absl import app, flags

import psjax
from psjax.decoding import autoregressive, speculative

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
flags.DEFINE_string("target", "smollm2-135m-instruct", "registry name or local HF directory")
flags.DEFINE_string("drafter", os.path.join(_REPO, "assets", "drafters",
                                            "smollm2-135m-instruct-parallelspec"),
                    "ParallelSpec drafter directory (HF format)")
flags.DEFINE_string("prompt", "Explain in three short paragraphs why the sky is blue.",
                    "the user's message")
flags.DEFINE_integer("max_new_tokens", 96, "tokens to generate at most")
flags.DEFINE_integer("k", 0, "draft length (0: all the drafter's drafts)")
flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "float32 is exact on CPUs")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    target = psjax.load_target(FLAGS.target, dtype=FLAGS.dtype)
    drafter, drafter_params = psjax.load_drafter(FLAGS.drafter, target, dtype=FLAGS.dtype)
    prompt = target.chat_prompt([FLAGS.prompt])
    kw = dict(max_new_tokens=FLAGS.max_new_tokens, eos_ids=target.eos_ids)
    k = FLAGS.k or drafter.config.draft_length

    def timed(fn):
        fn()  # compile
        start = time.perf_counter()
        out = fn()
        return out, time.perf_counter() - start

    ar, ar_s = timed(lambda: autoregressive.generate(target.module, target.params, [prompt],
                                                     **kw))
    spec, spec_s = timed(lambda: speculative.generate(
        target.module, target.params, [prompt], drafter=drafter, drafter_params=drafter_params,
        tree=k, **kw))
    text = target.tokenizer.decode(spec.sequences()[0], skip_special_tokens=True)
    n = int(spec.num_generated[0])
    print(f"\n{FLAGS.prompt}\n\n{text}\n")
    print(f"autoregressive: {n} tokens in {ar_s:.2f} s ({n / ar_s:.1f} tok/s)")
    print(f"ParallelSpec (k={k}): {spec.steps} target passes, tau {spec.tau:.2f}, "
          f"{spec_s:.2f} s ({n / spec_s:.1f} tok/s), speedup {ar_s / spec_s:.2f}x")
    if target.params["embed_tokens"]["embedding"].devices().pop().platform == "cpu":
        print("(on a CPU a verify pass over k + 1 tokens costs about k + 1 decode steps, so the "
              "speedup shows on accelerators; see README.md for GPU numbers)")
    same = spec.sequences() == ar.sequences()
    print("lossless: identical to autoregressive greedy output" if same else
          "MISMATCH: speculative output differs from autoregressive output")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    app.run(main)
