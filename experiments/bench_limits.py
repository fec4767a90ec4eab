"""The limit and the projection (issue 5) and where a decode step's time goes (issue 2).

For each model shape (random bfloat16 weights of the real shapes: the cost of a step does not
depend on the values), at batch --batch with --context tokens in the cache:
  floor_ms      bytes of weights + KV cache read per step / measured memory bandwidth
  ar_ms         a step of psjax's autoregressive loop at its default width
                (autoregressive.default_step_rows; sampling and bookkeeping included)
  spec_ms[m]    a step of psjax's speculative loop for method m (ParallelSpec with k masks and
                a random drafter, chain of k + 1 and tree; with --lookup_tree also prompt
                lookup in front of it): draft + verify + accept + commit
  verify_ms[m]  the same loop and tree with prompt lookup, a drafter that costs next to nothing:
                a verify step with its acceptance (timed once a tree: m_vN shares m's)
  spec_ms[m_vN] with --draft_vocab N, each ParallelSpec method again with its drafter's LM head
                reading N rows instead of the vocabulary (psjax.drafters.draft_vocab)
Then, with tau per method measured on real models (--tau_from: a Spec-Bench summary.json):
  bound   = tau x ar_ms / verify_ms[m]  the speedup with a free drafter
  project = tau x ar_ms / spec_ms[m]    the speedup with psjax's drafter at this shape
Step times are measured; bounds and projections are computed (measured tau, measured times).
A shape's loops are timed in rounds, one run of each per round (limits.per_step_seconds), so a GPU
that slows during the run favours none of them.

--profile_shape adds, for that shape: the AR step, kernels per step, device busy time per step
and the kernels that take it (a profiler trace of a generation), plain and with q/k/v and
gate/up fused (`Transformer(fused=True)`), and at each --profile_step_rows width; the same
trace of each speculative method's step, split into the engine's phases (draft, verify, accept,
commit) with --xla_dump_dir; and the AR step under each --xla_variants setting (a fresh process
each, since XLA reads its flags once). Why 4-row steps beat one-row ones at batch 1 (issue 2):
`launch/gpu_pipeline.sh profile --profile_step_rows 1,2,4 --profile_only`.
The split, on the GPU:

    XLA_FLAGS="--xla_dump_to=/tmp/hlo --xla_dump_hlo_module_re=.*_generate.*" \\
    PYTHONPATH=.:/tmp/site python3 experiments/bench_limits.py --shapes qwen2.5-0.5b \\
        --batch 8 --chain 2 --xla_variants '' --xla_dump_dir /tmp/hlo --out /tmp/out/limits.json

On the GPU (nothing to carry: no weights), from the repository root:

    PYTHONPATH=.:/tmp/site python3 experiments/bench_limits.py --out /tmp/out/limits.json

CPU smoke test: `--shapes smollm2-135m --context 16 --new_tokens 8 --repeats 1
--profile_shape smollm2-135m --xla_variants ''`.
"""

from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os
import subprocess
import sys
import time

from absl import app, flags
import jax.numpy as jnp
import numpy as np

from psjax.bench import limits
from psjax.bench.timing import measure_bandwidth_tbps, run_header
from psjax.decoding import autoregressive, speculative
from psjax.decoding.tree import Tree
from psjax.drafters.draft_vocab import DraftVocab
from psjax.drafters.prompt_lookup import PromptLookup
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models.llama import Transformer
from psjax.models.target import random_target

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("shapes", "smollm2-135m,qwen2.5-0.5b,qwen2.5-1.5b,llama-2-7b,llama-3-8b,"
                    "llama-2-13b", f"comma list of {sorted(limits.SHAPES)}")
flags.DEFINE_integer("batch", 1, "rows per step")
flags.DEFINE_integer("context", 512, "tokens already in the cache")
flags.DEFINE_integer("k", 7, "ParallelSpec masks: k + 1 drafts per pass")
flags.DEFINE_integer("chain", 0, "ParallelSpec chain: drafts verified per step (0: k + 1)")
flags.DEFINE_string("tree", "4,2,2,1", "ParallelSpec tree: branching per depth, or FILE.json:N "
                    "(experiments/design_tree.py's tree of N nodes)")
flags.DEFINE_string("lookup_tree", "", "also ParallelSpec with prompt lookup in front "
                    "(parallelspec_lookup) on this tree: FILE.json:N (design_tree.py "
                    "--lookup_depth's); '' = not measured")
flags.DEFINE_list("feature_layers", [], "the drafter's target feature layers (as the trained "
                  "drafter's config; empty: the final hidden state)")
flags.DEFINE_integer("draft_vocab", 0, "also each ParallelSpec method with a draft vocabulary "
                     "of this many tokens (method_vN; psjax.drafters.draft_vocab); 0 = not "
                     "measured")
flags.DEFINE_integer("new_tokens", 128, "tokens generated per timed run")
flags.DEFINE_integer("repeats", 3, "timed repeats (median)")
flags.DEFINE_string("tau_from", os.path.join(_REPO, "results", "specbench_qwen05b_h100",
                                             "summary.json"),
                    "Spec-Bench summary.json whose overall tau per method the projection uses")
flags.DEFINE_float("bandwidth_tbps", 0.0, "memory bandwidth for the floor; 0 = measure here")
flags.DEFINE_string("profile_shape", "qwen2.5-0.5b", "shape to profile ('' = none)")
flags.DEFINE_string("xla_variants", "no_command_buffer=--xla_gpu_enable_command_buffer=;"
                    "no_triton_gemm=--xla_gpu_enable_triton_gemm=false",
                    "name=XLA_FLAGS;... decode-step variants for --profile_shape")
flags.DEFINE_bool("fused", True, "the target with fused q/k/v and gate/up (load_target's "
                  "default) for the step times")
flags.DEFINE_string("xla_dump_dir", "", "the directory XLA_FLAGS' --xla_dump_to names (with "
                    "--xla_dump_hlo_module_re=.*_generate.*, and no JAX compilation cache): "
                    "splits each speculative step's kernel time by phase")
flags.DEFINE_bool("profile_only", False, "only --profile_shape's profile (no floor, step "
                  "times or projection)")
flags.DEFINE_list("profile_step_rows", [], "with --profile_shape, the autoregressive step also "
                  "at each of these widths (rows a step, `generate(step_rows=N)`), timed and "
                  "traced: why a wider step is faster at batch 1")
flags.DEFINE_bool("child", False, "internal: measure the profile shape's decode step only")
flags.DEFINE_string("out", "", "JSON file for all results")


def random_prompts(config, batch: int, length: int) -> list[list[int]]:
    rng = np.random.default_rng(0)
    return rng.integers(0, config.vocab_size, (batch, length)).tolist()


def ar_ms(module, params, prompts, prefill: float, step_rows: int | None = None) -> float:
    return 1e3 * limits.ar_step_seconds(module, params, prompts, new_tokens=FLAGS.new_tokens,
                                        prefill=prefill, repeats=FLAGS.repeats,
                                        step_rows=step_rows)


def newest_dump() -> str:
    """The optimized HLO of the speculative loop compiled last (XLA writes one per compile)."""
    files = glob.glob(os.path.join(FLAGS.xla_dump_dir, "*jit__generate*after_optimizations.txt"))
    if not files:
        raise FileNotFoundError(f"no *jit__generate*after_optimizations.txt in "
                                f"{FLAGS.xla_dump_dir}: set XLA_FLAGS=--xla_dump_to=DIR")
    with open(max(files, key=os.path.getmtime)) as f:
        return f.read()


def profile(target, prompts, prefill: float, methods: dict, dparams) -> dict:
    """The real autoregressive loop, plain and with fused projections, and the target's at each
    --profile_step_rows width: step time, and kernels and device busy time per step from a
    profiler trace of a generation. Then the same trace of the speculative loop for each
    method (drafter, tree)."""
    out = {}
    plain, fused = (Transformer(target.config, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                                fused=f) for f in (False, True))
    runs = [("plain", plain, None), ("fused", fused, None)] + [
        (f"step_rows_{rows}", target.module, int(rows)) for rows in FLAGS.profile_step_rows]
    for label, module, rows in runs:
        generate = functools.partial(autoregressive.generate, module, target.params, prompts,
                                     max_new_tokens=FLAGS.new_tokens, step_rows=rows)
        out[label] = {"step_rows": rows, "ar_ms": ar_ms(module, target.params, prompts,
                                                         prefill, rows),
                      "trace": limits.device_trace(generate, steps=FLAGS.new_tokens)}
    for method, (drafter, tree) in methods.items():
        run = lambda: speculative.generate(target.module, target.params, prompts, drafter=drafter,
                                           drafter_params=dparams, tree=tree,
                                           max_new_tokens=FLAGS.new_tokens)
        out[f"spec_{method}"] = limits.device_trace(
            run, steps=run().steps, hlo_text=newest_dump if FLAGS.xla_dump_dir else None)
        print(json.dumps({f"spec_{method}": out[f"spec_{method}"]}), flush=True)
    for variant in filter(None, FLAGS.xla_variants.split(";")):
        label, xla_flags = variant.split("=", 1)
        env = dict(os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {xla_flags}")
        cmd = [sys.executable, __file__, "--child", f"--shapes={FLAGS.profile_shape}",
               f"--batch={FLAGS.batch}", f"--context={FLAGS.context}",
               f"--new_tokens={FLAGS.new_tokens}", f"--repeats={FLAGS.repeats}",
               f"--fused={FLAGS.fused}"]  # the variants compare with the headline step
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        lines = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        out[label] = ({"xla_flags": xla_flags, **json.loads(lines[-1])} if lines else
                      {"xla_flags": xla_flags, "error": proc.stderr[-800:]})
    return out


def measure_shape(name: str, bandwidth: float | None, taus: dict) -> dict:
    config = limits.shape_config(name)
    target = random_target(config, dtype="bfloat16", fused=FLAGS.fused)
    prompts = random_prompts(config, FLAGS.batch, FLAGS.context)
    w_bytes = limits.param_bytes(target.params)
    kv = limits.kv_bytes(config, FLAGS.batch, FLAGS.context)
    prefill = limits.prefill_seconds(target.module, target.params, prompts, FLAGS.repeats)
    drafter, dparams = limits.random_drafter(target.module, FLAGS.k,
                                             map(int, FLAGS.feature_layers))
    methods = {"parallelspec": (drafter, Tree.chain(FLAGS.chain or FLAGS.k + 1)),
               "parallelspec_tree": (drafter, Tree.parse(FLAGS.tree))}
    if FLAGS.lookup_tree:
        methods["parallelspec_lookup"] = (WithPromptLookup(drafter),
                                          Tree.parse(FLAGS.lookup_tree))
    if FLAGS.draft_vocab:  # any N tokens cost the same: the first N
        vocab = DraftVocab(np.arange(FLAGS.draft_vocab))
        narrow = dataclasses.replace(drafter, draft_vocab=vocab)
        methods.update({f"{m}_v{vocab.size}": (
            WithPromptLookup(narrow) if isinstance(d, WithPromptLookup) else narrow, tree)
            for m, (d, tree) in list(methods.items())})
    if FLAGS.profile_only:
        return {"profile": profile(target, prompts, prefill, methods, dparams)}
    # Every loop timed in rounds (limits.per_step_seconds): their differences are the point.
    runs = {"ar": limits.ar_run(target.module, target.params, prompts,
                                new_tokens=FLAGS.new_tokens)}
    verify_of = {}  # tree -> its verify-only loop: a _vN twin drafts apart, verifies alike
    for method, (drafter, tree) in methods.items():
        run = functools.partial(limits.spec_run, target.module, target.params, prompts,
                                tree=tree, new_tokens=FLAGS.new_tokens)
        runs[f"spec_{method}"] = run(drafter, dparams)
        if tree not in verify_of:
            verify_of[tree] = f"verify_{method}"
            runs[verify_of[tree]] = run(PromptLookup(), None)  # a drafter costing next to nothing
    ms = {name: 1e3 * seconds for name, seconds in
          limits.per_step_seconds(runs, prefill, FLAGS.repeats).items()}
    row = {"weights_gb": w_bytes / 1e9, "kv_mb": kv / 1e6,
           "floor_ms": 1e3 * (w_bytes + kv) / (bandwidth * 1e12), "prefill_ms": 1e3 * prefill,
           "ar_ms": ms["ar"]}
    row["spec_ms"], row["verify_ms"], row["projection"] = {}, {}, {}
    for method, (drafter, tree) in methods.items():
        spec, verify = ms[f"spec_{method}"], ms[verify_of[tree]]
        row["spec_ms"][method], row["verify_ms"][method] = spec, verify
        if method in taus:
            tau = taus[method]
            row["projection"][method] = {"tau": tau, "T": tree.num_nodes + 1,
                                         "drafter_ms": spec - verify,
                                         "bound_speedup": tau * row["ar_ms"] / verify,
                                         "projected_speedup": tau * row["ar_ms"] / spec}
    print(time.strftime("%H:%M:%S"), json.dumps({name: row}), flush=True)
    if name == FLAGS.profile_shape:
        row["profile"] = profile(target, prompts, prefill, methods, dparams)
    return row


def read_taus(path: str) -> dict:
    if not path or not os.path.exists(path):
        return {}
    with open(path) as f:
        summary = json.load(f)
    return {m: v["overall"]["tau"] for m, v in summary["methods"].items() if "overall" in v}


def table(results: dict) -> str:
    methods = list(next(iter(results["shapes"].values()))["spec_ms"])
    lines = ["| shape | weights | floor | AR step | AR / floor | " + " | ".join(
        f"{m}: verify step, full step, bound, projected" for m in methods) + " |",
        "|" + " --- |" * (5 + len(methods))]
    for name, r in results["shapes"].items():
        cells = [name, f"{r['weights_gb']:.2f} GB", f"{r['floor_ms']:.3f} ms",
                 f"{r['ar_ms']:.3f} ms", f"{r['ar_ms'] / r['floor_ms']:.1f}x"]
        for m in methods:
            p = r["projection"].get(m)
            cells.append(f"{r['verify_ms'][m]:.3f} ms, {r['spec_ms'][m]:.3f} ms" + (
                f", {p['bound_speedup']:.2f}x, {p['projected_speedup']:.2f}x" if p else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv):
    del argv
    if FLAGS.child:
        name = FLAGS.shapes.split(",")[0]
        target = random_target(limits.shape_config(name), dtype="bfloat16", fused=FLAGS.fused)
        prompts = random_prompts(target.config, FLAGS.batch, FLAGS.context)
        prefill = limits.prefill_seconds(target.module, target.params, prompts, FLAGS.repeats)
        print(json.dumps({"ar_ms": ar_ms(target.module, target.params, prompts, prefill)}))
        return
    if FLAGS.profile_only and not FLAGS.profile_shape:
        raise app.UsageError("--profile_only profiles --profile_shape: name one")
    # A profile alone needs no floor: null in the JSON, not a bandwidth of 0.
    bandwidth = FLAGS.bandwidth_tbps or (None if FLAGS.profile_only else measure_bandwidth_tbps())
    taus = read_taus(FLAGS.tau_from)
    results = {**run_header(), "batch": FLAGS.batch,
               "context": FLAGS.context, "k": FLAGS.k, "chain": FLAGS.chain or FLAGS.k + 1,
               "tree": FLAGS.tree, "lookup_tree": FLAGS.lookup_tree,
               "feature_layers": FLAGS.feature_layers, "fused": FLAGS.fused,
               "bandwidth_tbps": bandwidth, "tau_from": FLAGS.tau_from, "taus": taus,
               "command": " ".join(sys.argv), "shapes": {}}
    for name in [FLAGS.profile_shape] if FLAGS.profile_only else FLAGS.shapes.split(","):
        results["shapes"][name] = measure_shape(name, bandwidth, taus)
        if FLAGS.out:
            os.makedirs(os.path.dirname(FLAGS.out) or ".", exist_ok=True)
            with open(FLAGS.out, "w") as f:
                json.dump(results, f, indent=1)
    if not FLAGS.profile_only:
        print(table(results))
    for name, r in results["shapes"].items():
        if "profile" in r:
            print(json.dumps({name: r["profile"]}, indent=1))


if __name__ == "__main__":
    app.run(main)
