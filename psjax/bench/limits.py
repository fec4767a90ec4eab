"""What the hardware allows: step times of random-weight models of real shapes, the memory floor,
and where a decode step's time goes (kernels launched, device busy time).

Random weights give the true cost of a step (the work does not depend on the values); acceptance
(tau) must come from real models, so projections multiply measured step times by a tau measured
elsewhere (a Spec-Bench summary.json).

Times are medians over repeats, after a warm-up call of the same shapes. A per-step time is a
generation's time less its prompt pass (timed apart), over its step count. Runs compared with
each other are timed in rounds (`per_step_seconds`), one of each per round: an H200 once took
4-13% longer for an identical step two minutes into a run
(results/specbench_qwen05b_h200_56t_draft_vocab/), more than some differences measured here.
"""

from __future__ import annotations

import functools
import glob
import gzip
import json
import os
import re
import statistics
import tempfile
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psjax.bench.timing import timed
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec
from psjax.models.config import ModelConfig
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer

# HF config.json fields of the shapes the benchmarks use (values as published on the Hub).
SHAPES: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(model_type="llama", vocab_size=49152, hidden_size=576,
                         intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, rope_theta=100000.0, rms_norm_eps=1e-5,
                         max_position_embeddings=8192, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=896,
                         intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(model_type="qwen2", vocab_size=151936, hidden_size=1536,
                         intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, rope_theta=1000000.0, rms_norm_eps=1e-6,
                         max_position_embeddings=32768, tie_word_embeddings=True),
    "llama-2-7b": dict(model_type="llama", vocab_size=32000, hidden_size=4096,
                       intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, rope_theta=10000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=4096, tie_word_embeddings=False),
    "llama-3-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096,
                       intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, rope_theta=500000.0, rms_norm_eps=1e-5,
                       max_position_embeddings=8192, tie_word_embeddings=False),
    "llama-2-13b": dict(model_type="llama", vocab_size=32000, hidden_size=5120,
                        intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                        num_key_value_heads=40, rope_theta=10000.0, rms_norm_eps=1e-5,
                        max_position_embeddings=4096, tie_word_embeddings=False),
}


def shape_config(name: str) -> ModelConfig:
    if name not in SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {sorted(SHAPES)}")
    return ModelConfig.from_hf_dict(SHAPES[name])


def random_drafter(target_module: Transformer, num_masks: int,
                   feature_layers: Sequence[int] = ()) -> tuple[parallelspec.ParallelSpec, Any]:
    """A bfloat16 ParallelSpec drafter with random weights for `target_module` (a random target
    of a real shape): its step costs what a trained drafter's does."""
    drafter = parallelspec.build(parallelspec.ParallelSpecConfig(
        target_module.config, num_masks=num_masks, feature_layers=tuple(feature_layers)),
        target_module, dtype=jnp.bfloat16)
    return drafter, parallelspec.init_params(drafter, jax.random.PRNGKey(1))


def param_bytes(params) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))


def kv_bytes(config: ModelConfig, batch: int, context: int, itemsize: int = 2) -> int:
    """Bytes of keys and values a step reads at `context` committed tokens per row."""
    return (2 * config.num_hidden_layers * batch * context * config.num_key_value_heads
            * config.head_dim * itemsize)


def _median_times(runs: dict[str, Callable[[], Any]], repeats: int
                  ) -> dict[str, tuple[Any, float]]:
    """Each run's last result and median seconds: one untimed call each (compilation), then
    `repeats` rounds of one timed call each, so that a machine slowing down slows all alike."""
    for fn in runs.values():
        fn()
    results = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            results[name].append(timed(fn))
    return {name: (r[-1][0], statistics.median(seconds for _, seconds in r))
            for name, r in results.items()}


@functools.partial(jax.jit, static_argnames=("module",))
def _prefill(module: Transformer, params, tokens, lengths):
    cache = KVCache.create(module.config, tokens.shape[0], tokens.shape[1], module.dtype)
    return common.prefill(module, params, tokens, lengths, cache)[0]


def prefill_seconds(module: Transformer, params, prompts, repeats: int = 3) -> float:
    tokens = jnp.asarray(prompts, jnp.int32)
    lengths = jnp.full((tokens.shape[0],), tokens.shape[1], jnp.int32)
    run = lambda: np.asarray(_prefill(module, params, tokens, lengths))
    return _median_times({"prefill": run}, repeats)["prefill"][1]


def per_step_seconds(runs: dict[str, Callable[[], int]], prefill: float, repeats: int
                     ) -> dict[str, float]:
    """Seconds per loop step of each run (run() generates and returns its step count), timed in
    rounds; `prefill` seconds (the prompt pass, measured apart) are taken off."""
    return {name: (seconds - prefill) / steps
            for name, (steps, seconds) in _median_times(runs, repeats).items()}


def ar_run(module: Transformer, params, prompts, *, new_tokens: int,
           step_rows: int | None = None) -> Callable[[], int]:
    """The autoregressive loop, each step a pass of `step_rows` rows (None: the default)."""
    return lambda: autoregressive.generate(module, params, prompts, max_new_tokens=new_tokens,
                                           step_rows=step_rows).steps


def spec_run(module: Transformer, params, prompts, drafter, drafter_params, tree: Tree, *,
             new_tokens: int) -> Callable[[], int]:
    """The speculative loop (draft + verify + accept + commit), whatever is accepted."""
    return lambda: speculative.generate(module, params, prompts, drafter=drafter,
                                        drafter_params=drafter_params, tree=tree,
                                        max_new_tokens=new_tokens).steps


def ar_step_seconds(module: Transformer, params, prompts, *, new_tokens: int, prefill: float,
                    repeats: int = 3, step_rows: int | None = None) -> float:
    """Seconds per autoregressive step, each a pass of `step_rows` rows (None: the default)."""
    run = ar_run(module, params, prompts, new_tokens=new_tokens, step_rows=step_rows)
    return per_step_seconds({"ar": run}, prefill, repeats)["ar"]


def spec_step_seconds(module: Transformer, params, prompts, drafter, drafter_params, tree: Tree,
                      *, new_tokens: int, prefill: float, repeats: int = 3) -> float:
    """Seconds per speculative step (draft + verify + accept + commit), whatever is accepted."""
    run = spec_run(module, params, prompts, drafter, drafter_params, tree, new_tokens=new_tokens)
    return per_step_seconds({"spec": run}, prefill, repeats)["spec"]


# ------------------------------------------------------------ where a decode step's time goes

_INSTRUCTION = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = .*?op_name="([^"]*)"', re.MULTILINE)
_UNNAMED_CALL = re.compile(r'^\s*(?:ROOT )?%([\w.\-]+) = (?:(?!op_name=).)*?calls=%([\w.\-]+)'
                           r'(?:(?!op_name=).)*$', re.MULTILINE)
_COMPUTATION = re.compile(r'^%([\w.\-]+) .*?\{\n(.*?)^\}', re.MULTILINE | re.DOTALL)


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """Instruction name -> op_name (its jax.named_scope path), from a compiled module's HLO text
    (`compiled.as_text()`, or an XLA dump's `*after_optimizations.txt`). A fusion whose own
    metadata has no op_name (XLA leaves it off some multi-output fusions) takes the first
    op_name inside the computation it calls."""
    ops = dict(_INSTRUCTION.findall(hlo_text))
    unnamed = dict(_UNNAMED_CALL.findall(hlo_text))
    if unnamed:
        bodies = dict(_COMPUTATION.findall(hlo_text))
        for name, called in unnamed.items():
            inner = _INSTRUCTION.search(bodies.get(called, ""))
            if inner:
                ops[name] = inner.group(2)
    return ops


def hlo_phases(hlo_text: str) -> dict[str, str]:
    """Instruction name -> phase, from a compiled module's HLO text: the first named scope
    inside the while loop's body (the speculative engine's draft, verify, accept, commit),
    `loop` for the body's other ops, `outside` for ops outside the loop (prefill)."""
    phases = {}
    for name, op in hlo_ops(hlo_text).items():
        _, body, inner = op.partition("/while/body/")
        scope = inner.split("/", 1)[0] if "/" in inner else "loop"
        scope = "loop" if scope.startswith("jit(") else scope  # an inlined jnp function
        phases[name] = scope if body else "outside"
    return phases


def kernel_ops(kernels: Sequence[str], hlo_text: str) -> dict[str, str]:
    """Profiled kernel name -> its HLO instruction's op_name (`fusion_1699` is `%fusion.1699`;
    '' for a library kernel, which has no instruction): which jax op a hot kernel computes."""
    ops = hlo_ops(hlo_text)
    return {k: ops.get(_instruction(k), ops.get(k, "")) for k in kernels}


def _instruction(kernel: str) -> str:
    return re.sub(r"_(\d+)$", r".\1", kernel)


def scope_phases(hlo_text: str, scopes: Sequence[str]) -> dict[str, str]:
    """Instruction name -> phase for a step without a loop (a train step): the outermost of
    `scopes` in its op_name (under a gradient it reads `jvp(drafter)/...`), with `backward/`
    before it for the gradient's ops (JAX names them `transpose(...)`); `other` where none is."""
    scope = re.compile(r"(?<!\w)(%s)(?!\w)" % "|".join(map(re.escape, scopes)))
    phases = {}
    for name, op in hlo_ops(hlo_text).items():
        found = scope.search(op)
        phase = found.group(1) if found else "other"
        phases[name] = f"backward/{phase}" if "transpose(" in op else phase
    return phases


def device_trace(fn: Callable[[], Any], steps: int,
                 hlo_text: Callable[[], str] | None = None,
                 phase_of: Callable[[str], dict[str, str]] = hlo_phases) -> dict[str, Any]:
    """Kernels per step and device busy time per step, from a profiler trace of fn() (which
    runs `steps` steps; what runs once, such as a prompt pass, is spread over them too), and
    the kernels that take it, by kind (trailing numbers dropped) and by name.

    A kernel's name is its HLO instruction's (`fusion_1699` is `%fusion.1699`), whose metadata
    names its op and jax.named_scope path; the trace does not carry that path while XLA's
    command buffers are on, so `hlo_text` (called after fn() compiled: the module's optimized
    HLO, e.g. from an XLA dump) gives the time per phase (`hlo_phases`; library kernels such as
    cuBLAS GEMMs and TopK have no HLO name: `unattributed`) and the op each top named kernel
    computes (`kernel_ops`); `phase_of` maps that text to instruction name -> phase. A name
    can stand for many launches: XLA compiles identical fusions once (their HLO carries one
    `deduplicated_name`; on an H200 the 48 per-layer gathers of `KVCache.gather_new` showed
    as one `loop_select_fusion_47` at 0.077 ms a step), so the top names come with their
    launches per step. Empty where the trace has no device kernels (CPU)."""
    fn()
    logdir = tempfile.mkdtemp(prefix="psjax_trace_")
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        fn()
    files = glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)
    if not files:
        return {"error": f"no trace json under {logdir}"}
    with gzip.open(files[0], "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {e["pid"]: e["args"]["name"] for e in events
                 if e.get("ph") == "M" and e.get("name") == "process_name"}
    gpu_pids = {pid for pid, name in processes.items() if re.search(r"/device:GPU", name)}
    kernels = [e for e in events if e.get("ph") == "X" and e.get("pid") in gpu_pids]
    if not kernels:
        return {"error": "no device events", "processes": sorted(set(processes.values()))[:20]}
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e.get("dur", 0))) for e in kernels)
    busy, end = 0.0, -np.inf
    for start, stop in spans:  # union of the kernels' intervals, microseconds
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    kinds: dict[str, float] = {}
    names: dict[str, float] = {}
    launches: dict[str, int] = {}
    for e in kernels:
        name, us = e.get("name", "?"), float(e.get("dur", 0))
        kind = re.sub(r"[_.]?\d+$", "", name)
        kinds[kind] = kinds.get(kind, 0.0) + us
        names[name] = names.get(name, 0.0) + us
        launches[name] = launches.get(name, 0) + 1
    ms = lambda us: round(us / steps / 1e3, 4)
    top = lambda d: {k: ms(v) for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:12]}
    out = {"kernels_per_step": len(kernels) / steps,
           "busy_ms_per_step": busy / steps / 1e3,
           "span_ms_per_step": (spans[-1][1] - spans[0][0]) / steps / 1e3,
           "top_kernels_ms_per_step": top(kinds),
           "top_named_kernels_ms_per_step": top(names)}
    out["top_named_kernels_launches_per_step"] = {
        k: launches[k] / steps for k in out["top_named_kernels_ms_per_step"]}
    if hlo_text is not None:
        text = hlo_text()
        phase_by_name = phase_of(text)
        phases: dict[str, float] = {}
        for name, us in names.items():
            phase = phase_by_name.get(_instruction(name), phase_by_name.get(name, "unattributed"))
            phases[phase] = phases.get(phase, 0.0) + us
        out["phases_ms_per_step"] = top(phases)
        out["top_named_kernels_op"] = kernel_ops(out["top_named_kernels_ms_per_step"], text)
    return out
