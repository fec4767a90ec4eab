"""Acceptance rules. They know nothing about models: logits and candidate tokens in, the accepted
path out, so tests drive them with hand-written logits.

Both rules work on a static `Tree` (a chain is the tree with one child per node). Node 0 is the
root, the last committed token; `node_tokens[:, i-1]` is node i's token; `target_logits[:, i]`
is the target's next-token logits after node i.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from psjax.decoding.sampling import Sampling, probabilities
from psjax.decoding.tree import Tree


class Acceptance(NamedTuple):
    path: jax.Array  # [B, D+1] node indices root -> last accepted node, padded by repetition
    num_accepted: jax.Array  # [B] accepted draft tokens (excluding the bonus token)
    bonus: jax.Array  # [B] the target's own token after the last accepted node


def greedy(tree: Tree, node_tokens: jax.Array, target_logits: jax.Array) -> Acceptance:
    """The deepest node whose whole path matches the target's argmax; then the target's argmax
    there. Among equally deep matches the lowest-ranked (first) node wins."""
    target_next = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, T+1]
    return _walk(tree, node_tokens, target_next, first_of_token_only=False)


def _walk(tree: Tree, node_tokens: jax.Array, target_next: jax.Array,
          first_of_token_only: bool) -> Acceptance:
    """Accepts node i iff its parent is accepted and its token is `target_next` at the parent;
    the path ends at the deepest accepted node (the first on ties), the bonus is `target_next`
    there. first_of_token_only: a node whose token an earlier sibling also carries is never
    accepted, so that each node's next token decides one child at most."""
    b, t1 = target_next.shape
    parents = jnp.asarray(tree.all_parents)
    match = node_tokens == target_next[:, parents[1:]]  # [B, T]
    if first_of_token_only:
        same = node_tokens[:, :, None] == node_tokens[:, None, :]  # [B, T, T]
        match &= ~jnp.any(same & jnp.asarray(tree.earlier_siblings), axis=-1)
    accepted = [jnp.ones((b,), bool)]
    for i, parent in enumerate(tree.parents):  # parents precede children
        accepted.append(accepted[parent] & match[:, i])
    accepted = jnp.stack(accepted, axis=1)  # [B, T+1]
    depths = jnp.asarray(tree.depths)
    score = jnp.where(accepted, depths * t1 - jnp.arange(t1), -1)
    best = jnp.argmax(score, axis=1)
    return Acceptance(path=jnp.asarray(tree.ancestors)[best], num_accepted=depths[best],
                      bonus=jnp.take_along_axis(target_next, best[:, None], axis=1)[:, 0])


def stochastic(tree: Tree, node_tokens: jax.Array, target_logits: jax.Array,
               draft_q: jax.Array | None, sampling: Sampling, rng: jax.Array) -> Acceptance:
    """Lossless speculative sampling; on trees, SpecInfer's multi-candidate rule.

    At the current node, children are tried in rank order: child x with draft probability q(x)
    is accepted with probability min(1, p(x) / q(x)); on rejection p becomes the normalised
    residual max(p - q, 0). If no child is accepted, the bonus token is drawn from the residual;
    if one is, the walk moves to it with a fresh p. With q the distribution each child was drawn
    from (independently), the emitted tokens follow the target's distribution exactly.

    draft_q: [B, D, V], the distribution the candidates at each depth were drawn from; None for
    deterministic drafters, whose q is one-hot on each node's token. Then the rule is the same
    as drawing the target's next token at every node from p and walking the tree as greedy
    verification walks it: a child is accepted with probability p(its token) and the rest of p
    is the residual. That is one draw per node in place of a pass over the vocabulary per
    child: 0.033 ms a step where the passes took 0.120 (of 1.52 ms; prompt lookup in front of
    a drafter, an 8-node tree, batch 1, H200, results/profile_h200_batch8_temperature1/).
    """
    p_all = probabilities(target_logits, sampling)  # [B, T+1, V]
    if draft_q is None:
        target_next = jax.random.categorical(rng, jnp.log(p_all), axis=-1).astype(jnp.int32)
        return _walk(tree, node_tokens, target_next, first_of_token_only=True)
    b = node_tokens.shape[0]
    rows = jnp.arange(b)
    children = jnp.asarray(tree.children)
    depths = jnp.asarray(tree.depths)
    node_tok = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), node_tokens], axis=1)

    current = jnp.zeros((b,), jnp.int32)
    alive = jnp.ones((b,), bool)
    path = [current]
    p = p_all[:, 0]
    keys = jax.random.split(rng, tree.max_depth * children.shape[1] + 1)
    for d in range(tree.max_depth):
        chosen = -jnp.ones((b,), jnp.int32)
        for r in range(children.shape[1]):
            child = children[current, r]  # [B]
            valid = alive & (child >= 0) & (chosen < 0)
            child = jnp.maximum(child, 0)
            x = node_tok[rows, child]
            q = draft_q[rows, jnp.maximum(depths[child] - 1, 0)]
            px, qx = p[rows, x], q[rows, x]
            u = jax.random.uniform(keys[d * children.shape[1] + r], (b,))
            accept = valid & (u * qx < px)
            chosen = jnp.where(accept, child, chosen)
            residual = jnp.maximum(p - q, 0.0)
            mass = residual.sum(-1, keepdims=True)
            residual = jnp.where(mass > 0, residual / jnp.where(mass > 0, mass, 1.0), p)
            p = jnp.where((valid & ~accept)[:, None], residual, p)
        moved = chosen >= 0
        current = jnp.where(moved, chosen, current)
        alive = alive & moved
        p = jnp.where(moved[:, None], p_all[rows, current], p)
        path.append(current)
    bonus = jax.random.categorical(keys[-1], jnp.log(p), axis=-1).astype(jnp.int32)
    return Acceptance(path=jnp.stack(path, axis=1), num_accepted=depths[current], bonus=bonus)


def accept(tree: Tree, node_tokens: jax.Array, target_logits: jax.Array,
           draft_q: jax.Array | None, sampling: Sampling, rng: jax.Array) -> Acceptance:
    if sampling.greedy:
        return greedy(tree, node_tokens, target_logits)
    return stochastic(tree, node_tokens, target_logits, draft_q, sampling, rng)
