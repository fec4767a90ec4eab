"""A draft vocabulary (the drafter proposes from its N most frequent answer tokens): the ranking
and its file, the restricted head's logits, and decoding that stays lossless, greedy and sampled."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import tiny_models
from psjax.bench import specbench
from psjax.convert import drafter_hf, hf
from psjax.decoding import autoregressive, speculative
from psjax.decoding.sampling import Sampling
from psjax.decoding.tree import Tree
from psjax.drafters import draft_vocab, parallelspec as ps
from psjax.drafters.base import Context, Prompt
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models.llama import Transformer


def _target(variant, vocab_size):
    _, path = tiny_models.make(variant, vocab_size=vocab_size)
    config, params = hf.load_hf_dir(path)
    return Transformer(config), params


def _drafter(module, vocab=None, seed=1):
    config = ps.ParallelSpecConfig(module.config, num_masks=3, input_mode="feature")
    drafter = ps.build(config, module, draft_vocab=vocab)
    return drafter, ps.init_params(drafter, jax.random.PRNGKey(seed))


def test_ranking_coverage_and_file(tmp_path):
    counts = draft_vocab.count([[3, 3, 1, 5], [3, 1, 0]], vocab_size=6)
    np.testing.assert_array_equal(counts, [1, 2, 0, 3, 0, 1])
    np.testing.assert_array_equal(draft_vocab.ranking(counts), [3, 1, 0, 5, 2, 4])  # ties: id
    assert draft_vocab.coverage(counts, [1, 2, 6]) == pytest.approx({1: 3 / 7, 2: 5 / 7, 6: 1.0})
    draft_vocab.save(str(tmp_path), counts)
    vocab = draft_vocab.load(str(tmp_path), 3, vocab_size=6)
    np.testing.assert_array_equal(vocab.ids, [0, 1, 3])  # the 3 most frequent, in id order
    assert vocab == draft_vocab.DraftVocab(np.array([0, 1, 3]))  # by content: a jit cache key
    assert hash(vocab) == hash(draft_vocab.DraftVocab(np.array([0, 1, 3])))
    assert vocab != draft_vocab.DraftVocab(np.array([3, 0, 1]))
    with pytest.raises(ValueError, match="choose 1..6"):
        draft_vocab.load(str(tmp_path), 7, vocab_size=6)
    with pytest.raises(ValueError, match="counted for another target"):
        draft_vocab.load(str(tmp_path), 3, vocab_size=8)
    with pytest.raises(FileNotFoundError, match="experiments/draft_vocab.py"):
        draft_vocab.load(str(tmp_path / "none"), 3, vocab_size=6)
    with pytest.raises(ValueError, match="outside the vocabulary of 6"):
        draft_vocab.count([[6]], vocab_size=6)
    with pytest.raises(ValueError, match="distinct"):
        draft_vocab.DraftVocab(np.array([1, 1]))


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_restricted_head_gives_the_full_heads_columns(variant):
    """The draft logits over a draft vocabulary are the full head's logits at its tokens, for an
    untied LM head and for one tied to the embedding table."""
    module, params = _target(variant, 64)
    ids = np.array([9, 0, 41, 7, 63, 22])
    full, dparams = _drafter(module)
    restricted = ps.build(full.config, module, draft_vocab=draft_vocab.DraftVocab(ids))
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, 64, (2, 7)), jnp.int32)
    features = jax.random.normal(jax.random.PRNGKey(3), (2, 7, full.config.feature_size))
    lengths = jnp.array([7, 5])
    context = Context(jnp.pad(tokens, ((0, 0), (0, 16))), lengths, params)
    logits = [d.draft_logits(dparams, d.init_state(dparams, Prompt(tokens, lengths, features),
                                                   context, 23), context)[0]
              for d in (full, restricted)]
    assert logits[1].shape == (2, 4, ids.size)
    np.testing.assert_allclose(logits[1], logits[0][..., ids], rtol=1e-5, atol=1e-5)


def test_draft_vocabulary_is_lossless_greedy():
    module, params = _target("llama_gqa_untied", 64)
    vocab = draft_vocab.DraftVocab(np.random.RandomState(1).permutation(64)[:20])
    drafter, dparams = _drafter(module, vocab)
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 64, n).tolist() for n in (5, 17, 9, 30)]
    ref = autoregressive.generate(module, params, prompts, max_new_tokens=30, eos_ids=(7,))
    for d, tree in ((drafter, Tree.chain(4)), (drafter, Tree.from_branching((2, 2, 1))),
                    (WithPromptLookup(drafter), Tree.from_branching((2, 2, 1, 1, 1)))):
        out = speculative.generate(module, params, prompts, drafter=d, drafter_params=dparams,
                                   tree=tree, max_new_tokens=30, eos_ids=(7,))
        assert out.sequences() == ref.sequences()


def test_draft_vocabulary_samples_losslessly():
    """Chi-square two-sample test of tokens 2-3 (joint) against autoregressive sampling: the
    drafter's q is zero outside its 6 tokens, and rejection sampling's residual restores them."""
    module, params = _target("llama_gqa_untied", 16)
    drafter, dparams = _drafter(module, draft_vocab.DraftVocab(np.array([3, 9, 0, 12, 5, 1])))
    sampling = Sampling(temperature=0.8)
    n = 20000
    prompt = [[3, 9, 3, 9, 3]] * n
    ref = autoregressive.generate(module, params, prompt, max_new_tokens=3, sampling=sampling,
                                  rng=jax.random.PRNGKey(1))
    out = speculative.generate(module, params, prompt, drafter=drafter, drafter_params=dparams,
                               tree=Tree.chain(2), max_new_tokens=3, sampling=sampling,
                               rng=jax.random.PRNGKey(2))
    assert out.accepted.sum() > out.steps  # some drafts were accepted
    a, b = (t[:, 1] * 16 + t[:, 2] for t in (ref.tokens, out.tokens))
    values = np.union1d(a, b)
    table = np.stack([(a[:, None] == values).sum(0), (b[:, None] == values).sum(0)])
    table = table[:, table.sum(0) >= 10]
    stat, p_value, dof, _ = scipy.stats.chi2_contingency(table)
    print(f"chi2={stat:.1f} dof={dof} p={p_value:.3f}")
    assert p_value > 1e-3, (stat, dof, p_value)


def test_exported_drafter_loads_with_its_ranking(tmp_path):
    module, params = _target("llama_gqa_untied", 64)
    drafter, dparams = _drafter(module)
    drafter_hf.save_drafter(str(tmp_path), drafter.config, dparams, "tiny-llama")
    with pytest.raises(FileNotFoundError, match="count the drafter's training answers"):
        drafter_hf.load_drafter(str(tmp_path), module, draft_vocab=8)
    draft_vocab.save(str(tmp_path), draft_vocab.count([[5, 5, 2, 9, 5, 2]], 64))
    loaded, _ = drafter_hf.load_drafter(str(tmp_path), module, draft_vocab=3)  # weights load
    np.testing.assert_array_equal(loaded.draft_vocab.ids, [2, 5, 9])
    assert drafter_hf.load_drafter(str(tmp_path), module)[0].draft_vocab is None


def test_spec_bench_names_a_draft_vocabulary():
    assert specbench.draft_vocab("parallelspec_lookup_n8_v32768") == ("parallelspec_lookup_n8",
                                                                       32768)
    assert specbench.draft_vocab("parallelspec_v16") == ("parallelspec", 16)
    assert specbench.draft_vocab("parallelspec_lookup") == ("parallelspec_lookup", None)
    assert specbench.is_known("parallelspec_lookup_v32768")
    assert specbench.is_known("parallelspec_k2_v4096")
    assert not specbench.is_known("parallelspec_v0") and not specbench.is_known("ar_v8")
