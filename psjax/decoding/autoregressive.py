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
were bitwise equal, prompt lookup's output equal token for token on 18 Spec-Bench questions, and
steps of 2-9 rows ran ~10% faster than one-row steps (README "On H200s (18)").
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp

from psjax.decoding import common
from psjax.decoding.sampling import GREEDY, Sampling, choose
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
             step_rows: int = 1) -> common.Generation:
    """Decodes a batch of token-id prompts (different lengths allowed) token by token, each
    step a pass of `step_rows` rows (module docstring)."""
    tokens, lengths = common.pad_prompts(prompts, pad_id, prompt_width)
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
