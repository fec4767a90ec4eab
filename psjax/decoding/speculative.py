"""The speculative decoding engine: draft, verify, accept, commit, emit, all in one jitted
`lax.while_loop` with a static tree (a chain of k drafts is the one-child-per-node tree).

One step, for every row of the batch at once:
  1. the drafter proposes `width` candidates for each of the next `depth` positions;
  2. the static tree turns them into nodes; the target runs once over [root, nodes] with the
     tree's attention mask (root = the last committed token, whose KV is not yet cached);
  3. the acceptance rule (greedy, or lossless sampling) picks the accepted path and a bonus token;
  4. the path's KV entries move into place and the cache index moves past them (the rest is
     rolled back by not moving); the accepted tokens and the bonus token are emitted.
Each row accepts its own number of tokens and stops on its own EOS; shapes never change.
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from psjax.decoding import common, verify
from psjax.decoding.autoregressive import is_eos
from psjax.decoding.sampling import GREEDY, Sampling, choose
from psjax.decoding.tree import Tree
from psjax.drafters.base import Accepted, Context, Drafter, Prompt
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer


@flax.struct.dataclass
class State:
    cache: KVCache  # target cache: holds sequence[:, :seq_len - 1]
    drafter_state: object
    sequence: jax.Array  # [B, S]
    seq_len: jax.Array  # [B]
    num_generated: jax.Array  # [B]
    done: jax.Array  # [B]
    accepted: jax.Array  # [max_steps, B] tokens emitted per step (0 once a row is done)
    step: jax.Array
    rng: jax.Array


def _first_true(mask: jax.Array) -> jax.Array:
    """Index of the first True along the last axis (its size when none)."""
    size = mask.shape[-1]
    return jnp.min(jnp.where(mask, jnp.arange(size), size), axis=-1)


@functools.partial(jax.jit, static_argnames=(
    "module", "drafter", "tree", "max_new_tokens", "sampling", "eos_ids", "cache_length",
    "cache_dtype"))
def _generate(module: Transformer, params, drafter: Drafter, drafter_params, tokens, lengths,
              rng, *, tree: Tree, max_new_tokens: int, sampling: Sampling,
              eos_ids: tuple[int, ...], cache_length: int, cache_dtype):
    b, width = tokens.shape
    rows = jnp.arange(b)
    depth = tree.max_depth
    module = module.clone(feature_layers=drafter.feature_layers)  # what the drafter reads
    cache = KVCache.create(module.config, b, cache_length, cache_dtype)
    logits, features, cache = common.prefill(module, params, tokens, lengths, cache)
    rng, key = jax.random.split(rng)
    first = choose(key, logits, sampling)
    sequence = jnp.zeros((b, cache_length), jnp.int32).at[:, :width].set(tokens)
    sequence = sequence.at[rows, lengths].set(first)
    context = Context(sequence, lengths + 1, params)
    drafter_state = drafter.init_state(drafter_params, Prompt(tokens, lengths, features), context,
                                       cache_length, depth)
    max_steps = max_new_tokens  # each step emits at least one token
    state = State(cache=cache, drafter_state=drafter_state, sequence=sequence,
                  seq_len=lengths + 1, num_generated=jnp.ones((b,), jnp.int32),
                  done=is_eos(first, eos_ids) | (max_new_tokens <= 1),
                  accepted=jnp.zeros((max_steps, b), jnp.int32), step=jnp.zeros((), jnp.int32),
                  rng=rng)
    node_depth = jnp.asarray(tree.depths[1:] - 1)
    node_rank = jnp.asarray(np.array(tree.ranks, np.int32))
    block_mask = jnp.broadcast_to(jnp.asarray(tree.attention), (b,) + tree.attention.shape)
    offsets = jnp.asarray(tree.depths)

    def cond(s: State):
        return (s.step < max_steps) & ~jnp.all(s.done)

    def body(s: State):
        # Named scopes put each phase in its ops' metadata (op_name): in an XLA dump they tell
        # which phase a profiled kernel belongs to (psjax.bench.limits.device_trace).
        rng, draft_key, accept_key = jax.random.split(s.rng, 3)
        context = Context(s.sequence, s.seq_len, params)
        with jax.named_scope("draft"):
            proposal, drafter_state = drafter.propose(drafter_params, s.drafter_state, context,
                                                      depth, tree.width, sampling, draft_key)
        node_tokens = proposal.candidates[:, node_depth, node_rank]  # [B, T]
        root = s.sequence[rows, s.seq_len - 1]
        block = jnp.concatenate([root[:, None], node_tokens], axis=1)  # [B, T+1]
        positions = (s.seq_len - 1)[:, None] + offsets[None, :]
        with jax.named_scope("verify"):
            out = module.apply({"params": params}, block, positions, s.cache, block_mask)
        with jax.named_scope("accept"):
            acc = verify.accept(tree, node_tokens, out.logits, proposal.q, sampling,
                                accept_key)

        # Emitted this step: the accepted drafts, then the bonus token.
        path_tokens = jnp.take_along_axis(block, acc.path, axis=1)  # [B, D+1]
        emitted = jnp.concatenate([path_tokens[:, 1:], jnp.zeros((b, 1), jnp.int32)], axis=1)
        emitted = emitted.at[rows, acc.num_accepted].set(acc.bonus)  # [B, D+1]
        count = acc.num_accepted + 1  # also the nodes kept: the old root + accepted drafts
        in_count = jnp.arange(depth + 1)[None, :] < count[:, None]
        eos_at = _first_true(is_eos(emitted, eos_ids) & in_count)
        count = jnp.minimum(jnp.minimum(count, eos_at + 1), max_new_tokens - s.num_generated)
        live = ~s.done
        count = jnp.where(live, count, 0)
        done = s.done | (eos_at < depth + 1) | (s.num_generated + count >= max_new_tokens)

        with jax.named_scope("commit"):
            # Write the emitted tokens after seq_len; slots past `count` are garbage until
            # overwritten, and rows that are done keep their sequence.
            written = jax.vmap(lambda seq, new, start: jax.lax.dynamic_update_slice(
                seq, new, (start,)))(s.sequence, emitted, s.seq_len)
            sequence = jnp.where(live[:, None], written, s.sequence)
            cache = out.cache if tree.is_chain else out.cache.gather_new(acc.path)
            cache = cache.commit(jnp.where(live, count, 0))
            seq_len = s.seq_len + count
            path_features = jnp.take_along_axis(out.features, acc.path[:, :, None], axis=1)
            drafter_state = drafter.commit(drafter_params, drafter_state,
                                           Accepted(num_path=count, path_features=path_features,
                                                    seq_len=seq_len))
            return State(cache=cache, drafter_state=drafter_state, sequence=sequence,
                         seq_len=seq_len, num_generated=s.num_generated + count, done=done,
                         accepted=s.accepted.at[s.step].set(count), step=s.step + 1, rng=rng)

    state = jax.lax.while_loop(cond, body, state)
    return state.sequence, state.num_generated, state.step, state.accepted


def generate(module: Transformer, params, prompts: Sequence[Sequence[int]], *,
             drafter: Drafter, drafter_params=None, tree: Tree | int = 4,
             max_new_tokens: int, sampling: Sampling = GREEDY, eos_ids: Sequence[int] = (),
             cache_length: int | None = None, rng: jax.Array | None = None,
             cache_dtype=None, pad_id: int = 0,
             prompt_width: int | Sequence[int] | None = None) -> common.Generation:
    """Speculative decoding of a batch of token-id prompts. `tree` is a Tree, or an int k for a
    chain of k drafts. Greedy output equals `autoregressive.generate`'s; sampled output follows
    the same distribution."""
    if isinstance(tree, (int, np.integer)):
        tree = Tree.chain(int(tree))
    vocab = module.config.vocab_size
    if drafter.vocab_size is not None and drafter.vocab_size != vocab:
        raise ValueError(
            f"the drafter proposes from a vocabulary of {drafter.vocab_size} tokens but the target "
            f"has {vocab}: a drafter must share the target's tokenizer (train or pick one for "
            "this target)")
    if drafter.max_depth is not None and tree.max_depth > drafter.max_depth:
        raise ValueError(f"the tree is {tree.max_depth} deep but the drafter proposes at most "
                         f"{drafter.max_depth} positions per step; use k <= {drafter.max_depth}")
    tokens, lengths = common.pad_prompts(prompts, pad_id, prompt_width)
    lookahead = max(tree.num_nodes + 1, drafter.cache_lookahead(tree.max_depth))
    if cache_length is None:
        cache_length = common.default_cache_length(int(tokens.shape[1]), max_new_tokens,
                                                   lookahead)
    common.check_capacity(lengths, tokens.shape[1], max_new_tokens, cache_length, lookahead)
    sequence, num_generated, steps, accepted = _generate(
        module, params, drafter, drafter_params, jnp.asarray(tokens), jnp.asarray(lengths),
        common.default_rng() if rng is None else rng, tree=tree,
        max_new_tokens=max_new_tokens, sampling=sampling, eos_ids=tuple(sorted(eos_ids)),
        cache_length=cache_length, cache_dtype=jnp.dtype(cache_dtype or module.dtype))
    sequence, num_generated, steps, accepted = jax.device_get(
        (sequence, num_generated, steps, accepted))  # one wait
    steps = int(steps)
    out = np.full((len(prompts), max_new_tokens), pad_id, np.int32)
    for row, (start, n) in enumerate(zip(lengths, num_generated)):
        out[row, :n] = sequence[row, start:start + n]
    return common.Generation(out, num_generated, steps, accepted[:steps])
