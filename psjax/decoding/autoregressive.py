"""Autoregressive decoding: the baseline every speedup is measured against.

Prefill in one pass, then one token per step inside a single jitted `lax.while_loop`; the cache is
donated and nothing returns to the host until the batch is done.

`step_rows` > 1 makes every step a pass of that many rows, the token in the first and copies of
it after, whose cache entries the next step overwrites (`common.step_pass`): the shapes of a
verify pass over that many tokens. In bfloat16 a verify pass of T rows rounds apart from a
one-row step, so greedy speculative output parts from the one-row loop's (the one speedups are
measured against) at near-ties; at step_rows = T every product, reduction and kernel tile has the
verify pass's shape: on the CPU a chain's logits are then bitwise equal
(`experiments/probe_exactness.py --step_rows T`) and the speculative output equals this loop's
token for token (tests/test_speculative.py). On an H200 three quarters of a chain's positions
were bitwise equal and prompt lookup's output equal token for token on 18 Spec-Bench questions
(README "On H200s (18)").

Left unnamed, `step_rows` is `default_step_rows(batch, config)`: for a model whose MLP products
a one-row step pads (llama.GEMM_PAD_MIN_WEIGHTS), a step feeds its products at least
STEP_MIN_ROWS rows on the backend (4 at batch 1 on a GPU, where such steps are the fastest);
one row at larger batches, for thinner models and on other backends.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from psjax.decoding import common
from psjax.decoding.sampling import GREEDY, Sampling, choose
from psjax.models import llama
from psjax.models.config import ModelConfig
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer


@flax.struct.dataclass
class State:
    cache: KVCache
    logits: jax.Array  # [B, V] logits of each row's next token
    output: jax.Array  # [B, max_new_tokens]
    num_generated: jax.Array  # [B]
    done: jax.Array  # [B] bool
    step: jax.Array  # scalar
    rng: jax.Array


def is_eos(tokens: jax.Array, eos_ids: tuple[int, ...]) -> jax.Array:
    if not eos_ids:
        return jnp.zeros(tokens.shape, bool)
    return jnp.isin(tokens, jnp.asarray(eos_ids, jnp.int32))


# Per backend, the rows a step's products get at least: a batch of B rows steps with
# ceil(STEP_MIN_ROWS / B) rows each (the token and copies). At batch 1 llama.matmul pads each
# large product of a one-row step to two rows (a pad, a slice and two barriers apiece); steps of
# several rows measured faster (not profiled; why 4 rows beat 2 is not known). H200,
# Qwen2.5-Coder-0.5B in bfloat16, 18 Spec-Bench prompts x 256 tokens
# (results/bench_ar_h200/bench_ar_qwen05b_2026-12-02_rows.json), tok/s at batch 1: one row
# 910.1, 2 rows 1,017.1, 4 rows 1,043.3, 9 rows 1,041.8 (eval_specbench on 18 questions,
# results/ar_step_rows_h200_18q/: 4 rows the fastest of 2-16); at batch 8 one row is
# the fastest (7,927 against 7,797 with 2 rows, 6,897 with 4). Batches of 2-3 are not measured.
# Not on a CPU, where a padded product is the slower one (llama.GEMM_MIN_ROWS), nor for a model
# whose MLP products are below the padding threshold (SmolLM2-135M: its products made GEMMs
# were slower, llama.GEMM_MIN_ROWS' comment; wider steps not measured there).
STEP_MIN_ROWS = {"gpu": 4}


def default_step_rows(batch: int, config: ModelConfig) -> int:
    """Rows of each step for a batch of `batch` rows when the caller names none: enough that
    the step's products have STEP_MIN_ROWS rows on the backend in use if the model's MLP
    products are large enough for llama.matmul to pad, else one."""
    if config.hidden_size * config.intermediate_size < llama.GEMM_PAD_MIN_WEIGHTS:
        return 1
    return max(1, -(-STEP_MIN_ROWS.get(jax.default_backend(), 1) // batch))


@functools.partial(jax.jit, static_argnames=("module", "max_new_tokens", "sampling", "eos_ids",
                                             "pad_id", "cache_length", "cache_dtype", "step_rows"))
def _generate(module: Transformer, params, tokens, lengths, rng, *, max_new_tokens: int,
              sampling: Sampling, eos_ids: tuple[int, ...], pad_id: int, cache_length: int,
              cache_dtype, step_rows: int):
    b = tokens.shape[0]
    # Created inside the jit: the cache never exists on the host and is updated in place.
    cache = KVCache.create(module.config, b, cache_length, cache_dtype)
    logits, _, cache = common.prefill(module, params, tokens, lengths, cache)
    state = State(cache=cache, logits=logits,
                  output=jnp.full((b, max_new_tokens), pad_id, jnp.int32),
                  num_generated=jnp.zeros((b,), jnp.int32), done=jnp.zeros((b,), bool),
                  step=jnp.zeros((), jnp.int32), rng=rng)

    def cond(s: State):
        return (s.step < max_new_tokens) & ~jnp.all(s.done)

    def body(s: State):
        rng, key = jax.random.split(s.rng)
        token = choose(key, s.logits, sampling)  # [B]
        live = ~s.done
        output = s.output.at[jnp.arange(b), s.num_generated].set(
            jnp.where(live, token, s.output[jnp.arange(b), s.num_generated]), mode="drop")
        num_generated = s.num_generated + live
        done = s.done | (live & is_eos(token, eos_ids)) | (num_generated >= max_new_tokens)
        out = common.step_pass(module, params, token, s.cache, step_rows)
        return State(cache=out.cache.commit(live), logits=out.logits[:, 0], output=output,
                     num_generated=num_generated, done=done, step=s.step + 1, rng=rng)

    state = jax.lax.while_loop(cond, body, state)
    return state.output, state.num_generated, state.step


def generate(module: Transformer, params, prompts: Sequence[Sequence[int]], *,
             max_new_tokens: int, sampling: Sampling = GREEDY, eos_ids: Sequence[int] = (),
             cache_length: int | None = None, rng: jax.Array | None = None,
             cache_dtype=None, pad_id: int = 0,
             prompt_width: int | Sequence[int] | None = None,
             step_rows: int | None = None) -> common.Generation:
    """Decodes a batch of token-id prompts (different lengths allowed) token by token, each
    step a pass of `step_rows` rows (default: `default_step_rows` of the batch and model;
    module docstring)."""
    tokens, lengths = common.pad_prompts(prompts, pad_id, prompt_width)
    if step_rows is None:
        step_rows = default_step_rows(len(lengths), module.config)
    lookahead = common.step_lookahead(step_rows)
    if cache_length is None:
        cache_length = common.default_cache_length(int(tokens.shape[1]), max_new_tokens,
                                                   lookahead)
    common.check_capacity(lengths, tokens.shape[1], max_new_tokens, cache_length, lookahead)
    output, num_generated, steps = _generate(
        module, params, jnp.asarray(tokens), jnp.asarray(lengths),
        common.default_rng() if rng is None else rng, max_new_tokens=max_new_tokens,
        sampling=sampling, eos_ids=tuple(sorted(eos_ids)), pad_id=pad_id,
        cache_length=cache_length, cache_dtype=jnp.dtype(cache_dtype or module.dtype),
        step_rows=step_rows)
    output, num_generated, steps = jax.device_get((output, num_generated, steps))  # one wait
    return common.Generation(output, num_generated, int(steps))
