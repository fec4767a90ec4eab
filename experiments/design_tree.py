"""A draft tree fitted to a ParallelSpec drafter (Medusa's sparse-tree construction), and the tau
every tree would get, measured without decoding speculatively.

For each Spec-Bench question the target answers greedily (psjax autoregressive decoding; or
sampled at --temperature, for trees that verify sampling: the engine's one draw per node accepts
exactly the drafts the sampled text follows, so a tree's tau on sampled text is sampling's); then
one group-wise pass of the drafter over the text (`ParallelSpec.training_logits`, equal to
drafting after each position: tested) gives, at every answer position and depth, the rank of
the target's next token among the drafter's top --width candidates. A tree's tau on those
ranks is exact for greedy decoding (`Tree.decoded`, stepping over each step's accepted
drafts; the mean over positions, `Tree.accepted_per_step`, is reported too and overstates it
where long accepts cluster, e.g. copies found by --lookup_depth), and `Tree.design` picks the best
tree of each size. Trees are designed on the questions after the first --per_category of each
category and measured on the first --per_category (the ones eval_specbench --limit runs), so
the designed trees are not measured on the text they were fitted to.

    PYTHONPATH=. python experiments/design_tree.py --target smollm2-135m-instruct \\
        --drafter assets/drafters/smollm2-135m-instruct-parallelspec --out /tmp/tree.json

`eval_specbench.py --ps_tree /tmp/tree.json:32` then runs the designed tree of 32 nodes, and
`--methods ar,parallelspec_tree_n8,parallelspec_tree_n16,parallelspec_tree_n32` three sizes side
by side: tau grows with the nodes, the step's cost too, and only the GPU says which wins.
"""

from __future__ import annotations

import functools
import json
import os
import sys

from absl import app, flags
import jax
import jax.numpy as jnp
import numpy as np

import psjax
from psjax.data import spec_bench
from psjax.decoding import autoregressive
from psjax.decoding.sampling import Sampling, top_k
from psjax.decoding.tree import Tree, decode_walk, position_mean
from psjax.drafters import with_lookup
from psjax.drafters.base import Context
from psjax.drafters.prompt_lookup import PromptLookup

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

FLAGS = flags.FLAGS
flags.DEFINE_string("target", "smollm2-135m-instruct", "registry name or HF directory")
flags.DEFINE_string("drafter", os.path.join(_REPO, "assets", "drafters",
                                            "smollm2-135m-instruct-parallelspec"),
                    "ParallelSpec drafter directory")
flags.DEFINE_enum("dtype", "float32", ["bfloat16", "float32"], "weights and compute dtype")
flags.DEFINE_string("questions", os.path.join(_REPO, "..", "shared", "data", "spec_bench",
                                              "question.jsonl"), "Spec-Bench question.jsonl")
flags.DEFINE_integer("per_category", 3, "questions per category measured on (and as many more "
                     "designed on)")
flags.DEFINE_integer("max_prompt_tokens", 1024, "skip first turns longer than this")
flags.DEFINE_integer("max_new_tokens", 128, "answer length")
flags.DEFINE_float("temperature", 0.0, "the answers' sampling temperature (0: greedy)")
flags.DEFINE_integer("seed", 0, "the answers' sampling seed")
flags.DEFINE_integer("batch_size", 4, "answers generated together")
flags.DEFINE_integer("width", 8, "candidates ranked per depth")
flags.DEFINE_list("num_nodes", ["8", "16", "32", "44", "64"], "designed tree sizes")
flags.DEFINE_multi_string("branching", ["4,2,2,1"], "a branching tree to compare (repeat "
                          "the flag for more)")
flags.DEFINE_integer("lookup_depth", 0, "> 0: the trees of the drafter with prompt lookup in "
                     "front (psjax.drafters.with_lookup, eval_specbench's parallelspec_lookup), "
                     "the lookup drafting up to this deep")
flags.DEFINE_string("out", "", "JSON file: the designed trees' paths and every tau")


def answers(target, questions, rng) -> list[tuple[list[int], int, str]]:
    """(prompt + answer token ids, prompt length, category) per question that fits."""
    prompts = [(target.chat_prompt(q["turns"][:1]), q["category"]) for q in questions]
    prompts = [(p, c) for p, c in prompts if len(p) <= FLAGS.max_prompt_tokens]
    out = []
    for i in range(0, len(prompts), FLAGS.batch_size):
        batch = prompts[i:i + FLAGS.batch_size]
        rng, key = jax.random.split(rng)
        gen = autoregressive.generate(target.module, target.params, [p for p, _ in batch],
                                      max_new_tokens=FLAGS.max_new_tokens,
                                      sampling=Sampling(FLAGS.temperature),
                                      eos_ids=target.eos_ids, rng=key)
        out += [(p + s, len(p), c) for (p, c), s in zip(batch, gen.sequences())]
    return out


# Texts and their anchors are padded to multiples of these, so that _candidates compiles once
# per bucket instead of once per text (padding sits after the text: causal attention and
# training_logits' `lengths` keep it out of sight).
TOKEN_BUCKET, ANCHOR_BUCKET = 128, 64


def _pad(values: np.ndarray, bucket: int) -> np.ndarray:
    """values padded to a multiple of `bucket` by repeating the last one."""
    return np.pad(values, (0, -len(values) % bucket), mode="edge")


@functools.partial(jax.jit, static_argnames=("target_module", "drafter", "width"))
def _candidates(target_params, drafter_params, tokens, anchors, length, *, target_module,
                drafter, width):
    """The drafter's top-`width` candidates [G, D, W] after each anchor of one text [1, L] whose
    first `length` tokens are real."""
    features = target_module.clone(feature_layers=drafter.feature_layers).apply(
        {"params": target_params}, tokens, jnp.arange(tokens.shape[1])[None],
        compute_logits=False).features
    logits = drafter.training_logits(drafter_params, target_params, tokens, features, anchors,
                                     jnp.reshape(length, (1,)))  # [1, G, D, V]
    return top_k(logits[0], width)[1]  # ranked as drafting ranks them


@functools.partial(jax.jit, static_argnames=("depth",))
def _with_lookup(own, tokens, anchors, *, depth):
    """`own` [G, D_own, W] with prompt lookup in front (`with_lookup.combine`), drafting after
    each anchor of one text [1, L] as the engine does (the context ends at the anchor)."""
    context = Context(sequence=jnp.broadcast_to(tokens, (anchors.shape[1], tokens.shape[1])),
                      seq_len=anchors[0] + 1, target_params=None)
    lookup, usable = PromptLookup().continuations(context, depth, 1)
    return with_lookup.combine(own, lookup[..., 0], usable[..., 0])


def draft_ranks(target, drafter, dparams, texts) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """[N, D]: at each answer position, the rank of the target's token at each depth among the
    drafter's candidates (-1: not among the top --width, or past the end); [N]: its text's
    category; [N]: its text's index."""
    depth = max(drafter.config.draft_length, FLAGS.lookup_depth)
    rows, categories, text_index = [], [], []
    for index, (tokens, prompt_length, category) in enumerate(texts):
        anchors = np.arange(prompt_length - 1, len(tokens) - 1)
        padded = jnp.asarray(_pad(np.asarray(tokens), TOKEN_BUCKET)[None])
        padded_anchors = jnp.asarray(_pad(anchors, ANCHOR_BUCKET)[None])
        cands = _candidates(target.params, dparams, padded, padded_anchors, len(tokens),
                            target_module=target.module, drafter=drafter, width=FLAGS.width)
        if FLAGS.lookup_depth:
            # The text past the anchor is masked by seq_len, as in decoding.
            cands = _with_lookup(cands, padded, padded_anchors, depth=depth)
        cands = np.asarray(cands)
        for g, anchor in enumerate(anchors):
            row = -np.ones(depth, np.int64)
            for d in range(depth):
                if anchor + d + 1 >= len(tokens):
                    break
                hit = np.nonzero(cands[g, d] == tokens[anchor + d + 1])[0]
                if not len(hit):
                    break
                row[d] = hit[0]
            rows.append(row)
        categories += [category] * len(anchors)
        text_index += [index] * len(anchors)
    return np.stack(rows), np.asarray(categories), np.asarray(text_index)


def main(argv):
    del argv
    target = psjax.load_target(FLAGS.target, FLAGS.dtype)
    drafter, dparams = psjax.load_drafter(FLAGS.drafter, target, FLAGS.dtype)
    both = spec_bench.load_questions(FLAGS.questions, 2 * FLAGS.per_category)
    seen = {}
    measure, design = [], []
    for q in both:  # by question id within each category: the first half is measured on
        seen[q["category"]] = seen.get(q["category"], 0) + 1
        (measure if seen[q["category"]] <= FLAGS.per_category else design).append(q)
    ranks, categories, text_index = {}, {}, {}
    rngs = jax.random.split(jax.random.PRNGKey(FLAGS.seed))
    for (name, qs), rng in zip((("measure", measure), ("design", design)), rngs):
        ranks[name], categories[name], text_index[name] = draft_ranks(
            target, drafter, dparams, answers(target, qs, rng))

    def taus(accepted, split, category=None):
        """(mean over drafting positions, `position_mean`; decoding's tau, tokens / steps over
        each text, `decode_walk`) for one tree's `accepted` [N] on `split` (of `category`)."""
        keep = np.ones(len(accepted), bool) if category is None else (
            categories[split] == category)
        walks = [decode_walk(accepted[text_index[split] == t])
                 for t in np.unique(text_index[split][keep])]
        return position_mean(accepted[keep]), sum(w[0] for w in walks) / max(
            sum(w[1] for w in walks), 1)

    depth = max(drafter.config.draft_length, FLAGS.lookup_depth)
    trees = {f"chain {k}": Tree.chain(k) for k in sorted({1, 2, 4, 6, 8, depth}) if k <= depth}
    trees.update({f"branching {b}": Tree.parse(b) for b in FLAGS.branching})
    designed = {int(n): Tree.design(ranks["design"], int(n)) for n in FLAGS.num_nodes}
    trees.update({f"designed {n}": t for n, t in designed.items()})
    results = {"target": FLAGS.target, "drafter": FLAGS.drafter, "dtype": FLAGS.dtype,
               "lookup_depth": FLAGS.lookup_depth, "temperature": FLAGS.temperature,
               "command": " ".join(sys.argv), "positions": {k: len(v) for k, v in ranks.items()},
               "tau": {}, "tau_per_category": {}, "tau_decoded_per_category": {},
               "designed": {n: [list(p) for p in t.paths]
                                                       for n, t in designed.items()}}
    print(f"drafting positions: {results['positions']}")
    # "measure"/"design": the mean over drafting positions; "*_decoded": what decoding gets,
    # stepping over what each step accepts (lower where long accepts cluster).
    print("| tree | nodes | tau decoded (measured questions) | tau decoded (design questions) "
          "| mean over positions (measured) | (design) |")
    print("| --- | --- | --- | --- | --- | --- |")
    accepted = {name: {s: tree.accepted(ranks[s]) for s in ranks} for name, tree in trees.items()}
    for name, tree in trees.items():
        (pos_m, dec_m), (pos_d, dec_d) = (taus(accepted[name][s], s) for s in ("measure", "design"))
        results["tau"][name] = {"nodes": tree.num_nodes, "measure": pos_m, "design": pos_d,
                                "measure_decoded": dec_m, "design_decoded": dec_d}
        print(f"| {name} | {tree.num_nodes} | {dec_m:.3f} | {dec_d:.3f} | {pos_m:.3f} | "
              f"{pos_d:.3f} |")
    names = list(dict.fromkeys(categories["measure"]))  # Spec-Bench's order
    print(f"\ntau decoded per category (measured questions)\n| tree | {' | '.join(names)} |")
    print("| --- |" + " --- |" * len(names))
    for name in trees:
        per = {c: taus(accepted[name]["measure"], "measure", c) for c in names}
        results["tau_per_category"][name] = {c: t[0] for c, t in per.items()}
        results["tau_decoded_per_category"][name] = {c: t[1] for c, t in per.items()}
        print(f"| {name} | " + " | ".join(f"{per[c][1]:.3f}" for c in names) + " |")
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    app.run(main)
