"""Spec-Bench: every decoding method, per category, against psjax's autoregressive baseline.

Methods (`--methods`, comma list, run in this order after `ar`, which always runs first):
  ar                 psjax autoregressive (the baseline: speedup 1.00), its default step
                     (autoregressive.default_step_rows: 4 rows at batch 1 on a GPU for a
                     model as wide as Qwen2.5-0.5B, its fastest; one row elsewhere)
  ar_rowsN           psjax autoregressive, each step a pass of N rows (the token and N - 1
                     copies): the shapes of a verify pass over N tokens; --reference;
                     ar_rows1 is the one-row loop (`ar` in results before README (19))
  pld                psjax prompt lookup, a chain of --pld_k drafts
  pld_tree           psjax prompt lookup, --pld_tree_width chains of --pld_k (one per match)
  sps                psjax draft-model speculative decoding (--draft, chain of --sps_k)
  parallelspec       psjax ParallelSpec (--drafter), a chain of --ps_k (0: the drafter's k)
  parallelspec_kN    psjax ParallelSpec, a chain of N drafts (N <= the drafter's k + 1): several
                     chain lengths side by side from one drafter
  parallelspec_tree  psjax ParallelSpec with the static tree --ps_tree (branching, or designed)
  parallelspec_lookup  psjax ParallelSpec with prompt lookup in front (psjax.drafters.
                     with_lookup), the tree --ps_lookup_tree (design_tree.py --lookup_depth)
  parallelspec_tree_nN, parallelspec_lookup_nN  the same with the N-node tree of the
                     design_tree.py file --ps_tree / --ps_lookup_tree names (FILE.json:M):
                     several tree sizes side by side
  hf_generate        transformers greedy generate (dynamic cache, eager)
  hf_static_compiled transformers with a static cache and the compiled decode step
  hf_pld             transformers prompt lookup (prompt_lookup_num_tokens=--hf_pld_k)
  hf_assisted        transformers assisted generation with --draft (same tokenizer only)
The protocol, the correctness check and the outputs are described in psjax/bench/specbench.py.

bfloat16 and the check: a verify pass of N rows rounds apart from a step of other rows, so greedy
speculative output can part from `ar`'s at near-ties; `ar_rowsN`, where N is the verify pass's
rows (tree nodes + 1: pld --pld_k 8 -> ar_rows9), computes with the verify pass's shapes (a
chain then parted from it nowhere, on the CPU and on 18 questions on an H200). `--reference
ar_rows9` checks every method against it (ar_rows9 itself against ar); speedups stay over ar.

`--interleave` runs each turn by every method in turn instead of each method over all questions
(the baseline alone first, to make the prompts): on a machine that slows during a run, the
method-by-method order favours the methods that run first (an H200's identical verify step took
4-13% longer two minutes later, results/specbench_qwen05b_h200_56t_draft_vocab/). Every method is
set up at once, and the outputs are written once, at the end.

Outputs under --out_dir (rewritten after every method, so a run cut short keeps what finished):
questions.jsonl (one line per question, turn and method), summary.json, chart.png; the markdown
table prints last.

On the GPU machine, after `launch/gpu_pipeline.sh setup`, `models` (the target converted into
/tmp/models/) and `train` (the drafter exported to /tmp/out/drafter_<model>), from the
repository root:

    M=ar,pld,pld_tree,parallelspec,parallelspec_tree,hf_generate,hf_static_compiled,hf_pld
    PYTHONPATH=.:/tmp/site python3 experiments/eval_specbench.py --target /tmp/models/smollm2 \
        --questions /tmp/spec_bench.jsonl --drafter /tmp/out/drafter_smollm2 --methods $M \
        --limit 3 --max_new_tokens 256 --text diverged --out_dir /tmp/out/specbench_smollm2

(The full protocol is --limit 0 --max_new_tokens 1024: hours for hf_generate, so split it by
method over several commands.) `--target` also takes a registry name or an HF directory; a .gguf
is converted once into `<file>.hf/`.

Smoke test on a CPU (`--drafter random` builds a random-weight drafter, saved and loaded back;
float32, so that any divergence at all would be a bug; in bfloat16 near-ties part, see
--mismatch_ulps):

    PYTHONPATH=. python experiments/eval_specbench.py --limit 1 --max_new_tokens 16 \
        --methods ar,pld,parallelspec --drafter random --dtype float32 \
        --out_dir /tmp/specbench_smoke
"""

from __future__ import annotations

import os
import sys
import tempfile

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch

from absl import app, flags  # noqa: E402
import jax  # noqa: E402

import psjax  # noqa: E402
from psjax.bench import hf_baselines, specbench  # noqa: E402
from psjax.bench.timing import card  # noqa: E402
from psjax.data import spec_bench  # noqa: E402
from psjax.decoding import autoregressive  # noqa: E402
from psjax.decoding.sampling import Sampling  # noqa: E402
from psjax.models import attention_kernel, llama  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct",
                    "registry name, local HF directory, or a .gguf file")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and compute dtype")
flags.DEFINE_string("methods", "ar,pld,pld_tree,hf_generate,hf_static_compiled,hf_pld",
                    f"comma list of {','.join(specbench.METHODS)}")
flags.DEFINE_string("questions", os.path.join(_REPO, "..", "shared", "data", "spec_bench",
                                              "question.jsonl"), "Spec-Bench question.jsonl")
flags.DEFINE_integer("limit", 0, "questions per category (the first by id); 0 = all")
flags.DEFINE_integer("max_new_tokens", 1024, "new tokens per turn at most (EOS stops a turn)")
flags.DEFINE_integer("warmup", 1, "untimed runs of the first question per method (compilation "
                     "at each new prompt shape is excluded anyway)")
flags.DEFINE_float("temperature", 0.0, "0 = greedy (the protocol); > 0 samples and skips the "
                   "comparison with ar")
flags.DEFINE_integer("top_k", 0, "sampling only")
flags.DEFINE_float("top_p", 1.0, "sampling only")
flags.DEFINE_integer("pld_k", 10, "pld / pld_tree: drafts per chain")
flags.DEFINE_integer("pld_tree_width", 3, "pld_tree: chains side by side")
flags.DEFINE_string("draft", "", "sps / hf_assisted draft model: registry name, HF dir or .gguf")
flags.DEFINE_integer("sps_k", 4, "sps: chain length")
flags.DEFINE_string("drafter", "", "ParallelSpec drafter directory (save_drafter's), or "
                    "`random` for a random-weight one (smoke tests)")
flags.DEFINE_integer("ps_k", 0, "parallelspec: chain length; 0 = all the drafter's drafts "
                     "(k masks + 1)")
flags.DEFINE_string("ps_tree", "4,2,2,1", "parallelspec_tree: branching per depth, or "
                    "FILE.json:N (experiments/design_tree.py's tree of N nodes)")
flags.DEFINE_string("ps_lookup_tree", "", "parallelspec_lookup: the tree (as --ps_tree; "
                    "empty: --ps_tree's)")
flags.DEFINE_list("prompt_width", [], "psjax: pad every prompt to this width (one compilation "
                  "per method; prefill pays for the padding), or to the smallest of several "
                  "(e.g. 512,2048: one compilation each); empty = powers of two")
flags.DEFINE_integer("hf_pld_k", 10, "hf_pld: prompt_lookup_num_tokens")
flags.DEFINE_float("mismatch_gap", specbench.MISMATCH_GAP,
                   "a divergence is a mismatch when the float32 top-2 logit gap exceeds this")
flags.DEFINE_float("mismatch_ulps", 0.0, "> 0: a divergence is also a near-tie when the gap "
                   "is within this many spacings of --dtype at the top logit (bfloat16: 2^-7 "
                   "of the logit, 0.25 at 32); 0 = the plain --mismatch_gap")
flags.DEFINE_enum("text", "all", ["all", "diverged"], "questions.jsonl text: every method's, "
                  "or the baseline's plus where a method diverged (smaller files)")
flags.DEFINE_integer("multiply_sum_pairs", llama.MULTIPLY_SUM_PAIRS, "psjax attention: "
                     "rows x queries x cache slots up to which a pass with a cache attends by "
                     "multiply-and-sum rather than matmuls (unset: llama.multiply_sum_pairs, 0 "
                     "in front of the Pallas kernel, 14336 otherwise; runs before 2026-12-02's "
                     "'On H200s (16)' had 14336 with the kernel too)")
flags.DEFINE_integer("multiply_sum_queries", llama.MULTIPLY_SUM_QUERIES, "psjax attention: "
                     "the most queries a row for which multiply-and-sum is used (1: one-token "
                     "steps only, verify passes as matmuls; llama.MULTIPLY_SUM_QUERIES)")
flags.DEFINE_enum("matmul_attention", llama.MATMUL_ATTENTION, llama.MATMUL_ATTENTION_FORMS,
                  "psjax attention: how the matmul form (verify passes) runs "
                  "(llama.MATMUL_ATTENTION; the one it resolves to is in summary.json)")
flags.DEFINE_integer("gemm_min_rows", 0, "psjax: products of fewer rows are padded to this "
                     "many, so XLA keeps them GEMMs (1 = off: a batch-1 decode step's "
                     "projections become reductions); 0 = llama.GEMM_MIN_ROWS' default")
flags.DEFINE_integer("gemm_pad_min_weights", llama.GEMM_PAD_MIN_WEIGHTS, "psjax: only "
                     "products with this many weights or more are padded to --gemm_min_rows "
                     "(0: every product; llama.GEMM_PAD_MIN_WEIGHTS)")
flags.DEFINE_integer("kernel_min_rows", attention_kernel.MIN_QUERY_ROWS, "psjax: the Pallas "
                     "attention kernel pads a KV head's query rows to at least this many (a "
                     "power of two >= 16; attention_kernel.MIN_QUERY_ROWS)")
flags.register_validator("kernel_min_rows", attention_kernel.is_tile_rows,
                         "--kernel_min_rows must be a power of two, at least 16")
flags.DEFINE_bool("interleave", False, "each turn by every method in turn (all set up at "
                  "once; the baseline runs alone first to make the prompts), not each method "
                  "over all questions: a machine that slows during the run then favours no "
                  "method (specbench.evaluate)")
flags.DEFINE_string("reference", specbench.BASELINE, "the method the others are checked "
                    "against, token for token: ar, or ar_rowsN (added after ar when missing "
                    "from --methods)")
flags.register_validator("reference", lambda name: name == specbench.BASELINE
                         or specbench.ar_rows(name) is not None,
                         f"--reference must be {specbench.BASELINE} or ar_rowsN")
flags.DEFINE_string("out_dir", "/tmp/psjax_specbench", "where the outputs go")


def random_drafter(target, num_masks: int) -> str:
    """A random-weight ParallelSpec drafter for `target`, written as a drafter directory."""
    from psjax.convert.drafter_hf import save_drafter
    from psjax.drafters import parallelspec
    config = parallelspec.ParallelSpecConfig(target.config, num_masks=num_masks)
    drafter = parallelspec.build(config, target.module)
    params = parallelspec.init_params(drafter, jax.random.PRNGKey(0))
    path = tempfile.mkdtemp(prefix="psjax_random_drafter_")
    save_drafter(path, config, params, target_name=FLAGS.target)
    return path


def main(argv):
    del argv
    knobs = dict(multiply_sum_pairs=FLAGS.multiply_sum_pairs,
                 multiply_sum_queries=FLAGS.multiply_sum_queries,
                 matmul_attention=FLAGS.matmul_attention,
                 gemm_pad_min_weights=FLAGS.gemm_pad_min_weights,
                 kernel_min_rows=FLAGS.kernel_min_rows)
    if FLAGS.gemm_min_rows:
        knobs["gemm_min_rows"] = FLAGS.gemm_min_rows
    with llama.numerics_as(**knobs):
        evaluate()


def evaluate():
    """The benchmark under the numerics `main` set: methods, target, questions, outputs."""
    names = [m for m in FLAGS.methods.split(",") if m]
    unknown = sorted(n for n in set(names) if not specbench.is_known(n))
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}; known: {list(specbench.METHODS)}, "
                             f"{specbench.NAMING}")
    first = list(dict.fromkeys([specbench.BASELINE, FLAGS.reference]))  # the reference second
    names = first + [m for m in dict.fromkeys(names) if m not in first]
    if FLAGS.dtype == "float32":  # true float32 matmuls (GPUs default to TF32): the exact check
        jax.config.update("jax_default_matmul_precision", "highest")
    hf_dir = hf_baselines.resolve_model(FLAGS.target)
    target = psjax.load_target(hf_dir, dtype=FLAGS.dtype)
    drafter_dir = FLAGS.drafter
    if drafter_dir == "random":
        drafter_dir = random_drafter(target, num_masks=4)
    sampling = Sampling(FLAGS.temperature, FLAGS.top_k, FLAGS.top_p)
    opts = specbench.Options(
        max_new_tokens=FLAGS.max_new_tokens, dtype=FLAGS.dtype, sampling=sampling,
        pld_k=FLAGS.pld_k, pld_tree_width=FLAGS.pld_tree_width, sps_k=FLAGS.sps_k,
        ps_k=FLAGS.ps_k, **specbench.tree_options(FLAGS.ps_tree, FLAGS.ps_lookup_tree),
        hf_pld_k=FLAGS.hf_pld_k,
        draft_dir=hf_baselines.resolve_model(FLAGS.draft) if FLAGS.draft else None,
        drafter_dir=drafter_dir or None,
        prompt_width=tuple(sorted(int(w) for w in FLAGS.prompt_width)) or None)
    try:
        methods, skipped = specbench.make_methods(names, target, hf_dir, opts)
    except ValueError as e:
        raise app.UsageError(str(e))
    for name, why in skipped.items():
        print(f"[{name}] skipped: {why}", flush=True)

    def load_float32():
        if FLAGS.dtype == "float32":
            return target.module, target.params
        print("loading a float32 copy of the target for the mismatch check", flush=True)
        t32 = psjax.load_target(hf_dir, dtype="float32", tokenizer=False)
        return t32.module, t32.params

    tok = target.tokenizer
    questions = spec_bench.load_questions(FLAGS.questions, FLAGS.limit or None)
    info = dict(card=card(), target=FLAGS.target, command="python " + " ".join(sys.argv),
                settings=dict(jax=jax.__version__, dtype=FLAGS.dtype, reference=FLAGS.reference,
                              interleave=FLAGS.interleave,
                              ar_step_rows=autoregressive.default_step_rows(1, target.config),
                              **llama.numerics()))

    def save(records, failures):
        summary = specbench.summarize(records, **info, failures={**skipped, **failures})
        return specbench.write_outputs(FLAGS.out_dir, records, summary)

    print(f"{len(questions)} questions; methods {', '.join(m.name for m in methods)}; "
          f"{info['card']}", flush=True)
    records, failures = specbench.evaluate(
        questions, methods, prompt_fn=target.chat_prompt,
        decode=lambda t: tok.decode(t, skip_special_tokens=True).strip(),
        judge=specbench.Float32Judge(load_float32, FLAGS.mismatch_gap, target.module.dtype,
                                     FLAGS.mismatch_ulps),
        warmup=FLAGS.warmup, check=sampling.greedy, keep_text=FLAGS.text,
        reference=FLAGS.reference, interleave=FLAGS.interleave,
        log=lambda s: print(s, flush=True), on_progress=save)
    table = save(records, failures)
    print(f"\noutputs in {FLAGS.out_dir}\n\n{table}")


if __name__ == "__main__":
    app.run(main)
