"""On the real SmolLM2-135M-Instruct (float32): psjax decodes exactly what transformers decodes,
and every drafter leaves the greedy output unchanged."""

import jax
import numpy as np
import torch
import transformers

from psjax.decoding import autoregressive, speculative
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec as ps
from psjax.drafters.draft_model import DraftModel
from psjax.drafters.prompt_lookup import PromptLookup
from psjax.models.llama import Transformer


def _prompts(target, questions, count, max_len=None):
    """First-turn chat prompts of Spec-Bench questions, spread over the categories."""
    by_category = {}
    for q in questions:
        by_category.setdefault(q["category"], []).append(q)
    chosen = []
    while len(chosen) < count:
        for items in by_category.values():
            if items and len(chosen) < count:
                ids = target.chat_prompt([items.pop(0)["turns"][0]])
                if max_len is None or len(ids) <= max_len:
                    chosen.append(ids)
    return chosen


def test_greedy_batch_matches_transformers(smollm2, smollm2_dir, spec_bench_questions):
    prompts = _prompts(smollm2, spec_bench_questions, 3)
    assert len({len(p) for p in prompts}) == 3, "want prompts of different lengths"
    out = autoregressive.generate(smollm2.module, smollm2.params, prompts, max_new_tokens=32)
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        smollm2_dir, dtype=torch.float32).eval()
    for prompt, ours in zip(prompts, out.sequences()):
        with torch.no_grad():
            theirs = reference.generate(torch.tensor([prompt]), max_new_tokens=32,
                                        do_sample=False, eos_token_id=None, pad_token_id=0)
        assert ours == theirs[0, len(prompt):].tolist()


def _random_drafter(config):
    """A one-layer drafter of SmolLM2's vocabulary with random weights: poor drafts."""
    import dataclasses
    small = dataclasses.replace(config, num_hidden_layers=1)
    module = Transformer(small)
    tokens = np.zeros((1, 4), np.int32)
    params = module.init(jax.random.PRNGKey(0), tokens, tokens)["params"]
    return DraftModel(module), jax.tree.map(lambda x: getattr(x, "value", x), params,
                                            is_leaf=lambda x: hasattr(x, "value"))


def test_speculative_greedy_is_lossless(smollm2, spec_bench_questions):
    """20 Spec-Bench prompts x 64 new tokens, batch 1 and batch 4 (different lengths): prompt
    lookup, a random-weight draft model and a random-weight ParallelSpec drafter (poor drafts,
    same output), chains and trees."""
    module, params = smollm2.module, smollm2.params
    prompts = _prompts(smollm2, spec_bench_questions, 20, max_len=256)
    # One prompt width and cache length: one compilation per variant and batch size.
    kw = dict(max_new_tokens=64, eos_ids=smollm2.eos_ids, prompt_width=256,
              cache_length=256 + 64 + 32)
    reference = []
    for i in range(0, 20, 4):
        reference += autoregressive.generate(module, params, prompts[i:i + 4],
                                             **kw).sequences()
    random_draft, random_draft_params = _random_drafter(smollm2.config)
    parallel = ps.build(ps.ParallelSpecConfig(smollm2.config, num_masks=3), module)
    parallel_params = ps.init_params(parallel, jax.random.PRNGKey(0))
    variants = [  # (name, drafter, params, tree, batch size)
        ("prompt_lookup/chain5", PromptLookup(), None, Tree.chain(5), 1),
        ("prompt_lookup/chain5", PromptLookup(), None, Tree.chain(5), 4),
        ("prompt_lookup/tree", PromptLookup(), None, Tree.from_branching((2, 2, 1)), 4),
        ("random_draft_model/chain3", random_draft, random_draft_params, Tree.chain(3), 4),
        ("random_parallelspec/chain4", parallel, parallel_params, Tree.chain(4), 1),
        ("random_parallelspec/tree", parallel, parallel_params,
         Tree.from_branching((3, 2, 1)), 4),
    ]
    for name, drafter, drafter_params, tree, batch in variants:
        got = []
        for i in range(0, 20, batch):
            got += speculative.generate(module, params, prompts[i:i + batch], drafter=drafter,
                                        drafter_params=drafter_params, tree=tree,
                                        **kw).sequences()
        mismatched = [i for i, (a, b) in enumerate(zip(got, reference)) if a != b]
        assert not mismatched, f"{name} batch {batch}: prompts {mismatched} differ"
