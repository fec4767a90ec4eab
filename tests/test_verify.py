"""Acceptance rules on hand-written logits, with exact expected outputs."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from psjax.decoding import verify
from psjax.decoding.sampling import Sampling, probabilities, top_k
from psjax.decoding.tree import Tree

V = 8


def _logits_favouring(tokens):
    """[1, len, V] logits whose argmax at row i is tokens[i]."""
    logits = np.zeros((1, len(tokens), V), np.float32)
    logits[0, np.arange(len(tokens)), tokens] = 5.0
    return jnp.asarray(logits)


def test_greedy_chain_accepts_longest_matching_prefix():
    tree = Tree.chain(4)
    drafts = jnp.array([[3, 1, 6, 2]])
    # Target wants 3, 1, 5, ... : two drafts accepted, bonus 5.
    acc = verify.greedy(tree, drafts, _logits_favouring([3, 1, 5, 0, 0]))
    assert acc.num_accepted.tolist() == [2]
    assert acc.bonus.tolist() == [5]
    assert acc.path.tolist() == [[0, 1, 2, 2, 2]]


def test_greedy_chain_all_accepted_and_none_accepted():
    tree = Tree.chain(3)
    drafts = jnp.array([[3, 1, 6], [4, 4, 4]])
    logits = jnp.concatenate([_logits_favouring([3, 1, 6, 7]), _logits_favouring([2, 4, 4, 4])])
    acc = verify.greedy(tree, drafts, logits)
    assert acc.num_accepted.tolist() == [3, 0]
    assert acc.bonus.tolist() == [7, 2]


def test_greedy_tree_follows_the_matching_branch():
    # Root has children ranks 0, 1 (nodes 1, 2); each has one child (nodes 3, 4).
    tree = Tree.from_branching((2, 1))
    assert tree.parents == (0, 0, 1, 2)
    drafts = jnp.array([[5, 6, 1, 2]])
    # Target: after root -> 6 (node 2), after node 2 -> 2 (node 4), after node 4 -> 7.
    logits = np.zeros((1, 5, V), np.float32)
    logits[0, 0, 6] = logits[0, 2, 2] = logits[0, 4, 7] = logits[0, 1, 0] = logits[0, 3, 0] = 5
    acc = verify.greedy(tree, drafts, jnp.asarray(logits))
    assert acc.num_accepted.tolist() == [2]
    assert acc.path.tolist() == [[0, 2, 4]]
    assert acc.bonus.tolist() == [7]


def test_stochastic_chain_single_step_probabilities():
    """One draft x ~ q: P(accept) = min(1, p(x)/q(x)); on rejection the bonus comes from the
    normalised residual max(p - q, 0). Checked exactly by enumerating uniform draws."""
    tree = Tree.chain(1)
    p = np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0], np.float32)
    q = np.array([0.2, 0.6, 0.2, 0, 0, 0, 0, 0], np.float32)
    target_logits = jnp.log(jnp.asarray(np.stack([p, p]))[None])  # [1, 2, V]
    draft_q = jnp.asarray(q)[None, None]  # [1, 1, V]
    sampling = Sampling(temperature=1.0)
    n = 4000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    fn = jax.jit(jax.vmap(lambda k: verify.stochastic(tree, jnp.array([[1]]), target_logits,
                                                      draft_q, sampling, k)))
    acc = fn(keys)
    accepted = np.asarray(acc.num_accepted[:, 0])
    # Draft token 1: accept with p/q = 0.5.
    assert abs(accepted.mean() - 0.5) < 0.03
    # Rejected: residual max(p - q, 0) = [0.3, 0, 0] -> always token 0.
    assert set(np.asarray(acc.bonus[:, 0])[accepted == 0].tolist()) == {0}


def test_stochastic_with_one_hot_drafts_rejects_to_the_rest():
    """Deterministic drafter (q one-hot): accept x with probability p(x); otherwise sample from p
    with x removed."""
    tree = Tree.chain(1)
    p = np.array([0.25, 0.25, 0.5, 0, 0, 0, 0, 0], np.float32)
    target_logits = jnp.log(jnp.asarray(np.stack([p, p]))[None])
    sampling = Sampling(temperature=1.0)
    keys = jax.random.split(jax.random.PRNGKey(1), 4000)
    acc = jax.jit(jax.vmap(lambda k: verify.stochastic(
        tree, jnp.array([[2]]), target_logits, None, sampling, k)))(keys)
    accepted = np.asarray(acc.num_accepted[:, 0])
    assert abs(accepted.mean() - 0.5) < 0.03
    assert 2 not in set(np.asarray(acc.bonus[:, 0])[accepted == 0].tolist())


def test_stochastic_one_hot_drafts_with_duplicate_siblings():
    """Two siblings carry the same token: only the first may be accepted, else the walk would
    choose between two draws of one distribution (the one reaching deeper), a biased choice.
    Root -> token 2 surely; then p = {5: .5, 6: .25, 7: .25}; node 3 (under the first 2)
    drafts 5, node 4 (under the second) 6. Lossless: the second token is 6 with probability .25
    (the biased walk gives .3125) and two drafts are accepted exactly when it is 5."""
    tree = Tree.from_branching((2, 1))
    p = np.full((5, V), 1.0 / V, np.float32)
    p[0] = np.eye(V)[2]
    p[1:3] = [0, 0, 0, 0, 0, 0.5, 0.25, 0.25]
    target_logits = jnp.log(jnp.asarray(p))[None]
    keys = jax.random.split(jax.random.PRNGKey(2), 8000)
    acc = jax.jit(jax.vmap(lambda k: verify.stochastic(
        tree, jnp.array([[2, 2, 5, 6]]), target_logits, None, Sampling(temperature=1.0), k)))(keys)
    accepted, bonus = np.asarray(acc.num_accepted[:, 0]), np.asarray(acc.bonus[:, 0])
    second = np.where(accepted == 2, 5, bonus)
    assert accepted.min() == 1 and abs((accepted == 2).mean() - 0.5) < 0.02
    assert abs((second == 6).mean() - 0.25) < 0.015
    assert (np.asarray(acc.path[:, 0])[accepted == 2] == [0, 1, 3]).all()


def test_sampling_filters():
    logits = jnp.log(jnp.array([[0.05, 0.1, 0.15, 0.3, 0.4, 0, 0, 0]]) + 1e-12)
    top_k = np.asarray(probabilities(logits, Sampling(1.0, top_k=2)))[0]
    np.testing.assert_allclose(top_k[:5], [0, 0, 0, 0.3 / 0.7, 0.4 / 0.7], atol=1e-6)
    top_p = np.asarray(probabilities(logits, Sampling(1.0, top_p=0.65)))[0]
    # 0.4 + 0.3 = 0.7 >= 0.65: the two largest stay.
    np.testing.assert_allclose(top_p[:5], [0, 0, 0, 0.3 / 0.7, 0.4 / 0.7], atol=1e-6)
    hot = np.asarray(probabilities(logits, Sampling(0.5)))[0]
    expected = np.array([0.05, 0.1, 0.15, 0.3, 0.4]) ** 2
    np.testing.assert_allclose(hot[:5], expected / expected.sum(), atol=1e-5)


@pytest.mark.parametrize("k", [1, 2, 5, 8, 9])  # 9: past ROUNDS_TOP_K, lax.top_k itself
def test_top_k_equals_lax_top_k_with_ties(k):
    rs = np.random.RandomState(k)
    logits = jnp.asarray(rs.randint(-3, 4, (2, 3, 40)).astype(np.float32))  # many ties
    scores = jnp.asarray(rs.randint(-1, 5, (2, 40)).astype(np.int32))  # lookup-style ints
    for x in (logits, scores):
        values, indices = top_k(x, k)
        ref_values, ref_indices = jax.lax.top_k(x, k)
        assert indices.dtype == jnp.int32
        np.testing.assert_array_equal(values, ref_values)
        np.testing.assert_array_equal(indices, ref_indices)


@pytest.mark.parametrize("bad, message", [
    (dict(parents=(0, 2), ranks=(0, 0)), "node 2 has parent index 2"),
    (dict(parents=(0, -1), ranks=(0, 0)), "node 2 has parent index -1"),
    (dict(parents=(0, 0), ranks=(0, 0)), "same candidate rank"),
    (dict(parents=(), ranks=()), "at least one node"),
])
def test_bad_trees_are_refused(bad, message):
    with pytest.raises(ValueError, match=message):
        Tree(**bad)


def test_bad_draft_length():
    with pytest.raises(ValueError, match="k must be >= 1"):
        Tree.chain(0)


def test_tree_structure():
    tree = Tree.from_paths([(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0)])
    assert tree.parents == (0, 0, 1, 1, 2, 3)
    assert tree.ranks == (0, 1, 0, 1, 0, 0)
    assert tree.depths.tolist() == [0, 1, 1, 2, 2, 2, 3]
    assert tree.width == 2 and tree.max_depth == 3 and not tree.is_chain
    assert tree.attention[6].tolist() == [True, True, False, True, False, False, True]
    assert Tree.chain(3).is_chain


def test_tree_design_from_ranks():
    """tau of a tree on measured ranks, and the best tree of a size: hand-counted."""
    ranks = np.array([[0, 0, 0],    # a chain of 3 accepts all
                      [0, 1, -1],   # second candidate at depth 2, nothing at depth 3
                      [1, 0, 0],
                      [0, 1, 0],
                      [-1, 0, 0]])  # the first draft misses: nothing past it counts
    assert Tree.chain(3).accepted_per_step(ranks) == 1 + (3 + 1 + 0 + 1 + 0) / 5
    assert Tree.from_branching((2, 2)).accepted_per_step(ranks) == 1 + (2 + 2 + 2 + 2 + 0) / 5
    # Path counts: (0,) 3, (0,1) 2, (1,) 1, (0,0) 1, (1,0) 1, (0,0,0) 1, (0,1,0) 1, (1,0,0) 1.
    tree = Tree.design(ranks, num_nodes=3)
    assert tree.paths == ((0,), (1,), (0, 1))
    assert tree.accepted_per_step(ranks) == 1 + (1 + 2 + 1 + 2 + 0) / 5
    assert Tree.design(ranks, num_nodes=100).accepted_per_step(ranks) == 1 + 11 / 5
    # Decoding one text with a chain of 3: row 0 accepts 3 and emits 4 tokens, so the next
    # step drafts at row 4 (accepts 0): 5 tokens in 2 steps, not the rows' mean 2.0.
    assert Tree.chain(3).decoded(ranks) == (5, 2)
    np.testing.assert_array_equal(Tree.chain(3).accepted(ranks), [3, 1, 0, 1, 0])
    with pytest.raises(ValueError, match="no row"):
        Tree.design(-np.ones((2, 3), int), num_nodes=4)


def test_tree_parse(tmp_path):
    assert Tree.parse("2,1") == Tree.from_branching((2, 1))
    path = tmp_path / "tree.json"
    path.write_text(json.dumps({"designed": {"3": [[0], [1], [0, 1]]}}))
    assert Tree.parse(f"{path}:3").paths == ((0,), (1,), (0, 1))
    with pytest.raises(ValueError, match="not 5"):
        Tree.parse(f"{path}:5")
