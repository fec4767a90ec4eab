"""Do a verify pass and one-token steps compute the same logits? (issue 3)

Greedy speculative decoding reproduces autoregressive output token for token only where the
target's verify pass over T tokens gives the logits its one-token steps give: in bfloat16 they
round apart (different GEMM shapes, kernel tiles, reduction orders), and at a near-tie the argmax
flips (eval_specbench's divergences and mismatches). `compare` measures it directly, position by
position, without a drafter or a benchmark's noise: it decodes greedily with one-token steps,
then feeds the same tokens again as verify passes of T tokens and compares each position's
logits. Layouts: "chain" (the T tokens in slot order, as prompt lookup's chain) and "tree" (the
path at every other slot with a decoy sibling between, then moved into place by
`KVCache.gather_new`, as tree verification does). Both run the model's own cached passes inside
`lax.scan`, as the decoding loops run them inside `while_loop`. `step_rows` makes each one-token
step a pass of that many rows (`common.step_pass`): at the verify pass's T rows the two have the
same shapes (on the CPU the chain's logits are then bitwise equal).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from psjax.decoding import common
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer

LAYOUTS = ("chain", "tree")


@functools.partial(jax.jit, static_argnames=("module", "steps", "rows", "cache_length"))
def _one_token_steps(module: Transformer, params, prompt, *, steps: int, rows: int,
                     cache_length: int):
    """Greedy one-token steps after the prompt [1, P]: the ids [N] and the logits [N, V] each
    step computed (after feeding id i: the logits that pick id i + 1), each step a pass of
    `rows` rows (`common.step_pass`)."""
    cache = KVCache.create(module.config, 1, cache_length, module.dtype)
    logits, _, cache = common.prefill(module, params, prompt, jnp.array([prompt.shape[1]]), cache)

    def step(carry, _):
        cache, logits = carry
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)  # [1]
        out = common.step_pass(module, params, token, cache, rows)
        carry = (out.cache.commit(jnp.ones(1, jnp.int32)), out.logits[:, 0])
        return carry, (token[0], out.logits[0, 0])

    _, (ids, step_logits) = jax.lax.scan(step, (cache, logits), None, length=steps)
    return ids, step_logits


def tree_layout(t: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The path's t tokens at slots 0, 2, ..., 2t - 2 with a decoy sibling of the next path node
    at each odd slot: (slot of each path node [t], depth of each slot [2t - 1], block mask
    [2t - 1, 2t - 1]: a node sees its ancestors and itself)."""
    n = 2 * t - 1
    parent = np.array([-1] + [2 * ((i - 1) // 2) for i in range(1, n)])  # slot i's parent slot
    depth = np.array([(i + 1) // 2 for i in range(n)])
    mask = np.eye(n, dtype=bool)
    for i in range(n):
        j = parent[i]
        while j >= 0:
            mask[i, j] = True
            j = parent[j]
    return np.arange(0, n, 2), depth, mask


@functools.partial(jax.jit, static_argnames=("module", "t", "layout", "cache_length"))
def _verify_passes(module: Transformer, params, prompt, ids, *, t: int, layout: str,
                   cache_length: int):
    """The ids [N] fed again after the prompt as N / t verify passes of t path tokens each, laid
    out as `layout`; returns the logits [N, V] at the path's positions."""
    cache = KVCache.create(module.config, 1, cache_length, module.dtype)
    _, _, cache = common.prefill(module, params, prompt, jnp.array([prompt.shape[1]]), cache)
    if layout == "chain":
        slots, depth, block = np.arange(t), np.arange(t), np.tril(np.ones((t, t), bool))
    else:
        slots, depth, block = tree_layout(t)
    vocab = module.config.vocab_size

    def verify(cache, chunk):  # chunk [t]: the path's tokens
        tokens = (chunk[depth] + 1) % vocab  # decoys: another token at each sibling slot
        tokens = tokens.at[slots].set(chunk)
        positions = cache.lengths[:, None] + jnp.asarray(depth)[None]
        out = module.apply({"params": params}, tokens[None], positions, cache,
                           jnp.asarray(block)[None])
        moved = out.cache if layout == "chain" else out.cache.gather_new(jnp.asarray(slots)[None])
        return moved.commit(jnp.array([t], jnp.int32)), out.logits[0, slots]

    _, logits = jax.lax.scan(verify, cache, ids.reshape(-1, t))
    return logits.reshape(ids.shape[0], -1)


def compare(module: Transformer, params, prompt: list[int], new_tokens: int, t: int,
            layouts=LAYOUTS, step_rows: int = 1) -> dict:
    """One-token steps (each a pass of `step_rows` rows, the token in the first) against verify
    passes of `t` tokens over `new_tokens` greedy tokens (rounded down to whole passes) after
    `prompt`. Per layout: positions compared, how many have bitwise-equal logits (also per path
    index in the pass: which rows of a pass round apart) and the same argmax, the largest
    |difference| and its mean over positions."""
    steps = new_tokens - new_tokens % t
    if steps < t:
        raise ValueError(f"new_tokens={new_tokens} gives no whole verify pass of t={t} tokens")
    tokens = jnp.asarray([prompt], jnp.int32)
    cache_length = common.default_cache_length(len(prompt), steps, max(2 * t, step_rows))
    ids, want = _one_token_steps(module, params, tokens, steps=steps, rows=step_rows,
                                 cache_length=cache_length)
    # Position i's one-token logits came after feeding ids[i]; a verify pass's path node i
    # is ids[i] too, so the two line up.
    out = {"positions": steps, "t": t, "step_rows": step_rows, "prompt_tokens": len(prompt)}
    for layout in layouts:
        got = _verify_passes(module, params, tokens, ids, t=t, layout=layout,
                             cache_length=cache_length)
        got, want_host = np.asarray(got, np.float32), np.asarray(want, np.float32)
        diff = np.abs(got - want_host).max(axis=-1)
        out[layout] = {
            "bitwise_equal": int((diff == 0).sum()),
            "bitwise_equal_by_index": (diff == 0).reshape(-1, t).sum(axis=0).tolist(),
            "argmax_equal": int((got.argmax(-1) == want_host.argmax(-1)).sum()),
            "max_abs_diff": float(diff.max()),
            "mean_max_abs_diff": float(diff.mean()),
        }
    return out
