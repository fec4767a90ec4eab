"""Autoregressive greedy decoding speed: psjax's compiled loop against transformers, side by side.

Methods (`--methods`, run in this order, each failure caught and reported as such):
  psjax_ar            psjax.decoding.autoregressive.generate: prefill + one jitted while_loop,
                      its default step (`default_step_rows`: 4 rows at batch 1 on a GPU for
                      a model as wide as Qwen2.5-0.5B).
  psjax_ar_rowsN      the same, each step a pass of N rows (the token and N - 1 copies:
                      `generate(step_rows=N)`, eval_specbench's ar_rowsN); psjax_ar_rows1 is
                      the one-row loop (`psjax_ar` in results before README "On H200s (19)").
  hf_generate         transformers `generate(do_sample=False)`, default dynamic cache, eager.
  hf_static_compiled  transformers `generate` with `cache_implementation="static"` and
                      `compile_config=CompileConfig(fullgraph=True, mode="reduce-overhead")`:
                      transformers 5 compiles the decode step itself when the cache is static
                      (prefill stays eager); `max_cache_len` fixes the cache size so one
                      compilation serves every prompt.
  hf_static_compiled_forward  (optional) the older recipe, `model.forward = torch.compile(
                      model.forward, mode="reduce-overhead", fullgraph=True)`, with generate's
                      own compilation disabled (the prefill is compiled too).

Fixed-length timing: every row generates exactly --max_new_tokens tokens (psjax: no EOS ids;
transformers: min_new_tokens = max_new_tokens), so all methods do the same work. Prompts are the
first --num_prompts of 3-per-category Spec-Bench questions (first turn, chat template),
interleaved across categories; at batch B they go in batches of B (different lengths: psjax
right-pads, transformers left-pads), the last batch wrapping around to the first prompts.
Compilation is excluded (warm-up first); wall time covers prefill + decoding of a batch, with
the device synchronised before the clock is read; the per-batch time is the median over repeats.
tokens/s = generated tokens / summed batch seconds; ms/step = seconds per batch / max_new_tokens.
The floor is the weight-read floor: weight bytes / --bandwidth_tbps (0 = measure it here).

On the GPU machine (no PyPI there: bring the GGUF as GPU.md says, plus the `gguf` wheel in
.whl/ for the conversion), from the repository root:

    PYTHONPATH=.:.whl python3 experiments/bench_decode.py --model /tmp/model.gguf \
        --out /tmp/out/bench_decode_smollm2.json

(`--model` also takes a registry name, `smollm2-135m-instruct`, or a local HF directory; a .gguf
is converted once into `<file>.hf/`.) Budget: one model per command; at the defaults
hf_generate is the slow one (~2.5 minutes at ~33 tok/s for batch 1), so it runs --hf_repeats (1)
times. The 18 default prompts reach 789 tokens (SmolLM2), so the cache is 1280 slots.

Smoke test on a CPU: `--num_prompts 2 --max_new_tokens 8 --batch_sizes 1,2`.
"""

from __future__ import annotations

import json
import os
import sys

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for torch

from absl import app, flags  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import psjax  # noqa: E402
from psjax.bench import hf_baselines, specbench  # noqa: E402
from psjax.bench.hf_baselines import count_params, resolve_model  # noqa: E402
from psjax.bench.timing import device_names as _device_names  # noqa: E402
from psjax.bench.timing import measure_bandwidth_tbps, time_batches, today  # noqa: E402
from psjax.data import spec_bench  # noqa: E402
from psjax.decoding import autoregressive, common  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("model", "smollm2-135m-instruct",
                    "registry name, local HF directory, or a .gguf file")
flags.DEFINE_enum("dtype", "bfloat16", ["bfloat16", "float32"], "weights and compute dtype")
flags.DEFINE_string("batch_sizes", "1,8", "comma-separated batch sizes")
flags.DEFINE_integer("max_new_tokens", 256, "tokens generated per row (exactly)")
flags.DEFINE_integer("num_prompts", 18, "Spec-Bench prompts (3 per category, interleaved)")
flags.DEFINE_string("questions", os.path.join(_REPO, "..", "shared", "data", "spec_bench",
                                              "question.jsonl"), "Spec-Bench question.jsonl")
flags.DEFINE_string("methods", "psjax_ar,hf_generate,hf_static_compiled", "methods to run")
flags.DEFINE_integer("repeats", 3, "timed passes of psjax_ar and hf_static_compiled* (median)")
flags.DEFINE_integer("hf_repeats", 1, "timed passes of hf_generate (slow: ~30 ms a step)")
flags.DEFINE_integer("cache_length", 0, "KV cache slots (psjax, HF static); 0 = the longest "
                     "padded prompt + max_new_tokens rounded up to 256, at least 1024")
flags.DEFINE_float("bandwidth_tbps", 0.0, "memory bandwidth for the floor; 0 = measure it "
                   "on this card (the H100 rows in the README used 2.86, the issue's figure)")
flags.DEFINE_string("out", "", "JSON file for all results (optional)")

HF_METHODS = ("hf_generate", "hf_static_compiled", "hf_static_compiled_forward")


# ---------------------------------------------------------------- set-up

def batch_sizes() -> list[int]:
    return [int(b) for b in FLAGS.batch_sizes.split(",")]


def batches(prompts: list[list[int]], b: int) -> list[list[list[int]]]:
    """Batches of exactly b prompts; the last wraps around to the first prompts."""
    k = -(-len(prompts) // b)
    return [[prompts[(i * b + j) % len(prompts)] for j in range(b)] for i in range(k)]


# ---------------------------------------------------------------- methods

def named_step_rows(method: str) -> int | None:
    """N for psjax_ar_rowsN, None for the others."""
    return specbench.ar_rows(method.removeprefix("psjax_")) if method.startswith("psjax_") else None


def is_psjax(method: str) -> bool:
    return method == "psjax_ar" or named_step_rows(method) is not None


def step_rows(method: str, batch: int, config) -> int | None:
    """Rows a step of a psjax method at `batch` (psjax_ar: generate's default for the model,
    psjax_ar_rowsN: N), None for the others."""
    if method == "psjax_ar":
        return autoregressive.default_step_rows(batch, config)
    return named_step_rows(method)


def bench_psjax(target, groups, n_new, cache_length, repeats, rows):
    def run(g):
        out = psjax.generate_autoregressive(target.module, target.params, g,
                                            max_new_tokens=n_new, eos_ids=(),
                                            cache_length=cache_length, step_rows=rows)
        assert (out.num_generated == n_new).all() and out.steps == n_new, out.num_generated
    # Every batch once: the jit specialises on the prompt width (a multiple of 64).
    return time_batches(run, groups, repeats, warmup=groups), {}


def bench_hf(method, hf_dir, dtype, groups, n_new, cache_length, repeats, pad_id):
    model = hf_baselines.load_model(hf_dir, dtype)
    kwargs = hf_baselines.generate_kwargs(method, model, max_new_tokens=n_new, pad_id=pad_id,
                                          cache_length=cache_length, fixed_length=True)

    def run(g):
        out = hf_baselines.generate(model, g, kwargs, pad_id)  # synchronises
        assert out.shape[1] == n_new, (out.shape, n_new)

    longest = max(groups, key=lambda g: max(len(p) for p in g))
    warmup = [longest] * (2 if "static" in method else 1)
    before = hf_baselines.compiled_graphs()
    try:
        secs = time_batches(run, groups, repeats, warmup)
        return secs, {"compiled_graphs": hf_baselines.compiled_graphs() - before}  # warm-up in
    finally:
        del model, kwargs
        hf_baselines.release()


# ---------------------------------------------------------------- report

def device_names(methods) -> dict:
    return _device_names(with_torch=any(m in HF_METHODS for m in methods))


def header(i: dict) -> list[str]:
    lengths = i["prompt_lengths"]
    return [
        f"# Greedy decoding, {i['model']}, {i['dtype']}, {i['date']}",
        "device: " + "; ".join(f"{k} = {v}" for k, v in i["devices"].items()),
        f"{len(lengths)} Spec-Bench prompts (first turn, chat template, {min(lengths)}-"
        f"{max(lengths)} tokens), exactly {i['max_new_tokens']} new tokens a row (no EOS stop), "
        f"cache {i['cache_length']}, median of {i['repeats']} (hf_generate {i['hf_repeats']}); "
        "ms/step includes the prefill",
        f"weight-read floor: {i['params'] / 1e6:.1f}M params x "
        f"{i['weight_bytes'] // i['params']} B = {i['weight_bytes'] / 1e9:.3f} GB / "
        f"{i['bandwidth_tbps']:.3g} TB/s = {i['floor_ms_per_step']:.4f} ms/step "
        f"({1e3 / i['floor_ms_per_step']:.0f} tokens/s at batch 1)"]


def table(rows, floor_ms, header) -> str:
    lines = header + ["", "| method | batch | tokens/s | ms/step | x vs best transformers | "
                      "x floor |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['method']} | {r['batch']} | failed: {r['error'][:120]} | | | |")
            continue
        hf = [x["tokens_per_s"] for x in rows if x["batch"] == r["batch"]
              and x["method"] in HF_METHODS and x["status"] == "ok"]
        vs = f"{r['tokens_per_s'] / max(hf):.2f}x" if hf else "-"
        lines.append(f"| {r['method']} | {r['batch']} | {r['tokens_per_s']:.1f} | "
                     f"{r['ms_per_step']:.3f} | {vs} | {r['ms_per_step'] / floor_ms:.1f}x |")
    return "\n".join(lines)


def run_methods(methods, target, hf_dir, prompts, n_new, cache_length) -> list[dict]:
    rows = []
    for method in methods:
        for b in batch_sizes():
            groups = batches(prompts, b)
            row = {"method": method, "batch": b, "num_batches": len(groups)}
            try:
                if width := step_rows(method, b, target.config):
                    row["step_rows"] = width
                    secs, extra = bench_psjax(target, groups, n_new, cache_length,
                                              FLAGS.repeats, width)
                else:
                    reps = FLAGS.hf_repeats if method == "hf_generate" else FLAGS.repeats
                    secs, extra = bench_hf(method, hf_dir, FLAGS.dtype, groups, n_new,
                                           cache_length, reps, pad_id_of(target))
                row.update(status="ok", batch_seconds=secs, **extra,
                           tokens_per_s=len(groups) * b * n_new / sum(secs),
                           ms_per_step=1e3 * sum(secs) / (len(groups) * n_new))
            except Exception as e:  # noqa: BLE001 - one method's failure must not stop the rest
                row.update(status="failed", error=f"{type(e).__name__}: {e}".replace("\n", " "))
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def pad_id_of(target) -> int:
    pad_id = target.tokenizer.pad_token_id
    return target.eos_ids[0] if pad_id is None else pad_id


def main(argv):
    del argv
    methods = [m for m in FLAGS.methods.split(",") if m]
    unknown = [m for m in methods if m not in HF_METHODS and not is_psjax(m)]
    if unknown:
        raise app.UsageError(f"unknown methods {unknown}: psjax_ar, psjax_ar_rowsN or "
                             f"{', '.join(HF_METHODS)}")
    hf_dir = resolve_model(FLAGS.model)
    target = psjax.load_target(hf_dir, dtype=FLAGS.dtype)
    prompts = [target.chat_prompt(turns)
               for turns in spec_bench.first_turns(FLAGS.questions, FLAGS.num_prompts)]
    n_new = FLAGS.max_new_tokens
    longest = -(-max(map(len, prompts)) // 64) * 64  # psjax pads prompts to multiples of 64
    lookahead = max((common.step_lookahead(step_rows(m, b, target.config) or 1)
                     for m in methods for b in batch_sizes()), default=0)
    cache_length = FLAGS.cache_length or max(
        1024, 256 * -(-(longest + n_new + lookahead) // 256))
    params = count_params(hf_dir)
    weight_bytes = params * jnp.dtype(FLAGS.dtype).itemsize
    bandwidth = FLAGS.bandwidth_tbps or measure_bandwidth_tbps()
    floor_ms = weight_bytes / (bandwidth * 1e12) * 1e3

    rows = run_methods(methods, target, hf_dir, prompts, n_new, cache_length)

    devices = device_names(methods)
    info = dict(command=" ".join(sys.argv), date=today(), devices=devices,
                model=FLAGS.model, hf_dir=hf_dir, dtype=FLAGS.dtype, max_new_tokens=n_new,
                fixed_length=True, cache_length=cache_length,
                prompt_lengths=list(map(len, prompts)),
                params=params, weight_bytes=weight_bytes, bandwidth_tbps=bandwidth,
                floor_ms_per_step=floor_ms, repeats=FLAGS.repeats, hf_repeats=FLAGS.hf_repeats)
    report = table(rows, floor_ms, header(info))
    print("\n" + report)
    if FLAGS.out:
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.out)), exist_ok=True)
        with open(FLAGS.out, "w") as f:
            json.dump({**info, "results": rows, "table": report}, f, indent=1)


if __name__ == "__main__":
    app.run(main)
