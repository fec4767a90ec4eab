"""The engine is lossless: greedy output equals autoregressive output token for token, and sampled
output follows the autoregressive distribution. On tiny random models (fast) and on the real
SmolLM2-135M-Instruct."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

import tiny_models
from psjax.convert import hf
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.common import CacheTooSmallError
from psjax.decoding.sampling import Sampling
from psjax.decoding.tree import Tree
from psjax.drafters.base import Context
from psjax.drafters.draft_model import DraftModel
from psjax.drafters.prompt_lookup import PromptLookup
from psjax.drafters.with_lookup import WithPromptLookup, merge_candidates
from psjax.models import attention_kernel, llama
from psjax.models.llama import Transformer

TREES = {"chain1": Tree.chain(1), "chain4": Tree.chain(4),
         "tree_3_2_1": Tree.from_branching((3, 2, 1))}


def _target_and_draft(vocab_size, dtype=jnp.float32):
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=vocab_size)
    config, params = hf.load_hf_dir(path, dtype)
    _, draft_path = tiny_models.make("qwen2_gqa_untied", seed=5, vocab_size=vocab_size,
                                     num_layers=1)
    draft_config, draft_params = hf.load_hf_dir(draft_path, dtype)
    return (Transformer(config, dtype=dtype, param_dtype=dtype), params,
            Transformer(draft_config, dtype=dtype, param_dtype=dtype), draft_params)


@pytest.fixture(scope="module")
def tiny():
    return _target_and_draft(64)


@pytest.fixture(scope="module")
def tiny16():
    """A 16-token vocabulary, so that 20,000 samples fill a chi-square table."""
    return _target_and_draft(16)


def _drafters(tiny):
    module, params, draft_module, draft_params = tiny
    return {"prompt_lookup": (PromptLookup(), None),
            "draft_random": (DraftModel(draft_module), draft_params),
            "draft_self": (DraftModel(module), params),  # perfect drafts: long accepts
            "lookup_then_draft": (WithPromptLookup(DraftModel(draft_module)), draft_params)}


@pytest.mark.parametrize("tree", sorted(TREES))
@pytest.mark.parametrize("drafter", ["prompt_lookup", "draft_random", "draft_self",
                                     "lookup_then_draft"])
def test_tiny_greedy_lossless(tiny, drafter, tree):
    module, params, *_ = tiny
    drafter, drafter_params = _drafters(tiny)[drafter]
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 64, n).tolist() for n in (5, 17, 9, 30)]
    for batch in (prompts[:1], prompts):  # batch 1, and batch 4 of different lengths
        ref = autoregressive.generate(module, params, batch, max_new_tokens=40, eos_ids=(7,))
        out = speculative.generate(module, params, batch, drafter=drafter,
                                   drafter_params=drafter_params, tree=TREES[tree],
                                   max_new_tokens=40, eos_ids=(7,))
        assert out.sequences() == ref.sequences()
        assert out.accepted.sum() == ref.num_generated.sum() - len(batch)  # first token: prefill


@pytest.mark.parametrize("tree", ["chain4", "tree_3_2_1"])
def test_tiny_greedy_lossless_through_the_attention_kernel(tiny, tree, monkeypatch):
    """Verify passes through the Pallas kernel (llama.MATMUL_ATTENTION "pallas"; interpreted on
    the CPU) leave greedy output unchanged, batch 1 and 4."""
    module, params, *_ = tiny
    drafter, drafter_params = _drafters(tiny)["lookup_then_draft"]
    monkeypatch.setattr(llama, "MATMUL_ATTENTION", "pallas")
    traced = []
    kernel = attention_kernel.attend
    monkeypatch.setattr(attention_kernel, "attend", lambda *a, **k: traced.append(1) or
                        kernel(*a, **k))
    rs = np.random.RandomState(3)
    prompts = [rs.randint(0, 64, n).tolist() for n in (6, 19, 11, 27)]
    for batch in (prompts[:1], prompts):
        ref = autoregressive.generate(module, params, batch, max_new_tokens=33, eos_ids=(7,))
        out = speculative.generate(module, params, batch, drafter=drafter,
                                   drafter_params=drafter_params, tree=TREES[tree],
                                   max_new_tokens=33, eos_ids=(7,))
        assert out.sequences() == ref.sequences()
    assert traced  # the verify passes went through the kernel


@pytest.fixture(scope="module")
def tiny_bf16():
    """The tiny target and draft model in bfloat16, where verify passes round apart."""
    return _target_and_draft(64, jnp.bfloat16)


@pytest.mark.parametrize("drafter,tree", [("prompt_lookup", "chain8"),
                                          ("lookup_then_draft", "tree_3_2_1")])
def test_tiny_bfloat16_greedy_equals_autoregressive_at_the_verify_width(tiny_bf16, drafter,
                                                                        tree):
    """In bfloat16 a verify pass of T rows rounds apart from a one-token step, so greedy output
    parts from one-row autoregressive decoding at near-ties (it does here: the test's teeth);
    it equals, token for token, autoregressive decoding whose steps are T-row passes
    (step_rows = T: the same shapes), batch 4 of different lengths."""
    module, params, *_ = tiny_bf16
    drafter, drafter_params = _drafters(tiny_bf16)[drafter]
    tree = {**TREES, "chain8": Tree.chain(8)}[tree]
    rows = tree.num_nodes + 1
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 64, n).tolist() for n in (5, 17, 9, 30, 12, 23, 7, 38)]
    parted = 0
    for batch in (prompts[:4], prompts[4:]):
        kw = dict(max_new_tokens=48, eos_ids=(7,))
        one_row = autoregressive.generate(module, params, batch, step_rows=1, **kw).sequences()
        wide = autoregressive.generate(module, params, batch, step_rows=rows, **kw).sequences()
        out = speculative.generate(module, params, batch, drafter=drafter,
                                   drafter_params=drafter_params, tree=tree, **kw)
        assert out.sequences() == wide
        parted += sum(a != b for a, b in zip(one_row, wide))
    assert parted > 0  # else the two autoregressive forms agree and equality proves nothing


def test_default_step_rows(tiny_bf16, monkeypatch):
    """Left unnamed, a step has enough rows that its products get the backend's STEP_MIN_ROWS
    (one on the CPU), for a model whose MLP products a one-row step pads (llama.
    GEMM_PAD_MIN_WEIGHTS). With the table set to 4 and the tiny model counted as wide, a batch
    of one decodes exactly as with step_rows = 4, a batch of four as with one row."""
    module, params, *_ = tiny_bf16
    config = module.config
    assert autoregressive.default_step_rows(1, config) == 1  # the CPU: one row
    monkeypatch.setitem(autoregressive.STEP_MIN_ROWS, jax.default_backend(), 4)
    assert autoregressive.default_step_rows(1, config) == 1  # too thin for padded products
    monkeypatch.setattr(llama, "GEMM_PAD_MIN_WEIGHTS", 0)
    assert [autoregressive.default_step_rows(b, config) for b in (1, 2, 3, 4, 8)] == [4, 2, 2,
                                                                                      1, 1]
    rs = np.random.RandomState(1)
    prompts = [rs.randint(0, 64, n).tolist() for n in (5, 17, 9, 30)]
    kw = dict(max_new_tokens=24, eos_ids=(7,))
    for p in prompts:
        assert (autoregressive.generate(module, params, [p], **kw).sequences()
                == autoregressive.generate(module, params, [p], step_rows=4, **kw).sequences())
    assert (autoregressive.generate(module, params, prompts, **kw).sequences()
            == autoregressive.generate(module, params, prompts, step_rows=1, **kw).sequences())


def test_bad_step_rows(tiny):
    module, params, *_ = tiny
    with pytest.raises(ValueError, match="step_rows must be >= 1"):
        autoregressive.generate(module, params, [[1]], max_new_tokens=4, step_rows=0)


def test_prompt_lookup_continuations_by_recency():
    # Row 0's tail "1 2" matches at 0 and 3 (3 is the latest): rank 0 continues with 9 5, rank 1
    # with 3 1; row 1's "8" matches nowhere earlier (no continuation).
    seq = np.array([[1, 2, 3, 1, 2, 9, 5, 1, 2, 0], [4, 5, 6, 8, 0, 0, 0, 0, 0, 0]])
    context = Context(jnp.asarray(seq), jnp.asarray([9, 4]), None)
    lookup = PromptLookup(max_ngram=2)
    tokens, usable = lookup.continuations(context, depth=2, width=2)
    np.testing.assert_array_equal(tokens[0], [[9, 3], [5, 1]])
    np.testing.assert_array_equal(usable, [[[True, True], [True, True]], [[False, False]] * 2])
    # Width 1 (the lookup in front of a drafter) is rank 0 of the wider search.
    narrow, narrow_usable = lookup.continuations(context, depth=2, width=1)
    np.testing.assert_array_equal(narrow, tokens[..., :1])
    np.testing.assert_array_equal(narrow_usable, usable[..., :1])


def test_lookup_candidates_come_first_without_duplicates():
    own = np.array([[[5, 6, 7], [8, 9, 1], [2, 3, 4]]])  # [B=1, D=3, W=3]
    lookup = np.array([[6, 4, 9]])
    usable = np.array([[True, True, False]])
    merged = merge_candidates(lookup, usable, own)
    # depth 0: 6 first, its copy in own dropped; depth 1: 4 first, own's last falls off;
    # depth 2: no lookup, own as it was.
    np.testing.assert_array_equal(merged, [[[6, 5, 7], [4, 8, 9], [2, 3, 4]]])


def test_lookup_proposes_past_the_drafters_depth(tiny):
    module, params, draft_module, draft_params = tiny
    drafter = WithPromptLookup(_DepthLimited(draft_module))
    prompt = [[3, 9, 4, 3, 9, 4, 3, 9, 4, 3, 9, 4, 3]]
    ref = autoregressive.generate(module, params, prompt, max_new_tokens=24)
    out = speculative.generate(module, params, prompt, drafter=drafter,
                               drafter_params=draft_params, tree=Tree.chain(6),
                               max_new_tokens=24)
    assert out.sequences() == ref.sequences()
    assert out.accepted.max() > 2  # the lookup drafted past the drafter's 2


@dataclasses.dataclass(frozen=True)
class _DepthLimited(DraftModel):
    @property
    def max_depth(self):
        return 2


def test_self_drafting_accepts_everything(tiny):
    module, params, *_ = tiny
    out = speculative.generate(module, params, [[1, 2, 3]], drafter=DraftModel(module),
                               drafter_params=params, tree=4, max_new_tokens=41)
    assert out.tau == pytest.approx(5.0)  # 4 drafts + the bonus token every step


@pytest.mark.parametrize("drafter, tree", [("draft_random", "chain4"),
                                           ("draft_random", "tree_3_2_1"),
                                           ("prompt_lookup", "tree_3_2_1"),
                                           ("lookup_then_draft", "tree_3_2_1")])
def test_tiny_sampling_lossless(tiny16, drafter, tree):
    """Chi-square two-sample test on the joint of generated tokens 2 and 3 (the first token comes
    from the prefill; the next ones go through verification) and on token 4's marginal."""
    module, params, *_ = tiny16
    drafter, drafter_params = _drafters(tiny16)[drafter]
    sampling = Sampling(temperature=0.7, top_k=8)
    n = 20000
    prompt = [[3, 9, 3, 9, 3]] * n  # repetitive: prompt lookup finds matches
    ref = autoregressive.generate(module, params, prompt, max_new_tokens=4, sampling=sampling,
                                  rng=jax.random.PRNGKey(1))
    out = speculative.generate(module, params, prompt, drafter=drafter,
                               drafter_params=drafter_params, tree=TREES[tree],
                               max_new_tokens=4, sampling=sampling, rng=jax.random.PRNGKey(2))
    assert out.accepted.sum() > out.steps  # some drafts were accepted (checks it is exercised)
    for cells in (lambda t: t[:, 1] * 16 + t[:, 2], lambda t: t[:, 3]):
        a, b = cells(ref.tokens), cells(out.tokens)
        values = np.union1d(a, b)
        table = np.stack([(a[:, None] == values).sum(0), (b[:, None] == values).sum(0)])
        table = table[:, table.sum(0) >= 10]  # chi-square needs expected counts >= 5
        stat, p_value, dof, _ = scipy.stats.chi2_contingency(table)
        print(f"chi2={stat:.1f} dof={dof} p={p_value:.3f}")
        assert p_value > 1e-3, (stat, dof, p_value)


def test_vocabulary_mismatch_is_refused(tiny):
    module, params, *_ = tiny
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=96, num_layers=1)
    config, draft_params = hf.load_hf_dir(path)
    with pytest.raises(ValueError, match="vocabulary of 96 tokens but the target has 64"):
        speculative.generate(module, params, [[1, 2]], drafter=DraftModel(Transformer(config)),
                             drafter_params=draft_params, max_new_tokens=4)


def test_max_new_tokens_beyond_cache(tiny):
    module, params, *_ = tiny
    with pytest.raises(CacheTooSmallError, match="plus 5 draft slots needs"):
        speculative.generate(module, params, [[1] * 30], drafter=PromptLookup(), tree=4,
                             max_new_tokens=40, cache_length=64)
    with pytest.raises(CacheTooSmallError, match="raise cache_length"):
        autoregressive.generate(module, params, [[1] * 70], max_new_tokens=1, cache_length=64)


def test_default_cache_is_whole_slot_chunks():
    """Without a cache_length the loops make room for the padded prompt, the generation and the
    lookahead, in whole chunks of llama.SLOT_CHUNK slots (the chunked attention form's unit)."""
    assert common.default_cache_length(512, 1024, 11) == 1664
    assert common.default_cache_length(16, 8) == 128
    assert common.default_cache_length(128, 256) == 384


def test_bad_draft_length(tiny):
    module, params, *_ = tiny
    with pytest.raises(ValueError, match="k must be >= 1"):
        speculative.generate(module, params, [[1]], drafter=PromptLookup(), tree=0,
                             max_new_tokens=4)


def test_prompt_width_buckets(tiny):
    """Several prompt widths: each batch takes the smallest that holds it (one compilation per
    width); the padding does not change the output."""
    assert common.pad_prompts([[1] * 5], width=(32, 8))[0].shape == (1, 8)
    assert common.pad_prompts([[1] * 5, [1] * 20], width=(8, 32))[0].shape == (2, 32)
    assert common.pad_prompts([[1] * 5], width=16)[0].shape == (1, 16)
    with pytest.raises(CacheTooSmallError, match="prompt_width=32; raise prompt_width"):
        common.pad_prompts([[1] * 40], width=(8, 32))
    module, params, *_ = tiny
    prompt = [[3, 1, 4, 1, 5]]
    kw = dict(max_new_tokens=6, cache_length=48)
    assert (autoregressive.generate(module, params, prompt, prompt_width=(8, 32), **kw).sequences()
            == autoregressive.generate(module, params, prompt, prompt_width=32, **kw).sequences())
