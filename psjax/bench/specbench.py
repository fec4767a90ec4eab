"""Spec-Bench evaluation: every decoding method on the same questions, timed turn by turn and
checked token by token against the autoregressive baseline.

Protocol (Spec-Bench's, ../shared/data/README.md): batch 1, greedy unless asked otherwise, every
method times each turn between device synchronisations (its outputs are on the host when the
clock stops), compilation excluded (warm-up runs first, and the first call at each new prompt
shape runs once untimed: the jitted loops specialise on the padded prompt width). tokens = the
generated tokens, EOS included where it stops the turn. A question's tokens/s is its tokens over
its seconds, summed over its turns; a category's tokens/s is the mean over its questions; a
method's speedup is its category tokens/s over the autoregressive baseline's (`ar`: psjax's
loop with its default step, `autoregressive.default_step_rows`, 4 rows at batch 1 on a GPU for
Qwen2.5-0.5B; results before README "On H200s (19)" call the one-row loop, now `ar_rows1`,
`ar`). tau is the
mean number of tokens a target forward pass commits (the bonus token counted): the mean of
`Generation.accepted` over all steps for psjax's speculative methods, generated tokens per target
forward call for transformers' assisted generation, 1 for plain decoding.

Methods run one after another over all questions (the baseline first), so one set of models is
in memory at a time. Multi-turn (MT-bench) questions: the second turn is conditioned on the
BASELINE's first answer (its decoded text) for every method, so all methods see identical
prompts and their outputs can be compared token for token.

Correctness: a method's tokens are compared with the reference's for the same turn (the
baseline's, or with `reference=ar_rowsN` those of autoregressive decoding whose steps are passes
of N rows: a verify pass's shapes, which greedy speculative decoding with N-row verify passes
can reproduce bit for bit in bfloat16 too, `psjax.decoding.autoregressive`); a turn whose
tokens differ is a divergence (at most one per turn: after the first differing token the two
continue from different contexts). A divergence is a mismatch unless it is a near-tie: the target
in float32 (a float32 copy of the weights, loaded once, only when the first divergence needs it)
runs on prompt + the common prefix, and the gap between its top-2 logits at the first differing
position decides: gap > 0.05 => mismatch (a real error); otherwise a rounding-level tie that a
bfloat16 run may break either way. In float32 runs the same test applies to every divergence.
bfloat16 logits are themselves rounded to 2^-7 of their size (0.25 at 32), so bfloat16 runs part
from the baseline at float32 gaps well above 0.05; the records keep the gap in those spacings
(`gap_ulps`), and `Float32Judge(ulps=...)` (--mismatch_ulps) can count such ties as near-ties.

The entry point is experiments/eval_specbench.py. On the GPU machine, after
`launch/gpu_pipeline.sh setup`, `models` (the target converted into /tmp/models/) and `train`
(the drafter exported to /tmp/out/drafter_<model>), from the repository root:

    M=ar,pld,pld_tree,parallelspec,parallelspec_tree,hf_generate,hf_static_compiled,hf_pld
    PYTHONPATH=.:/tmp/site python3 experiments/eval_specbench.py --target /tmp/models/smollm2 \
        --questions /tmp/spec_bench.jsonl --drafter /tmp/out/drafter_smollm2 --methods $M \
        --limit 3 --max_new_tokens 256 --text diverged --out_dir /tmp/out/specbench_smollm2
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import traceback
from typing import Callable, Hashable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from psjax.bench import hf_baselines
from psjax.bench.timing import timed, today
from psjax.data.spec_bench import CATEGORIES
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.sampling import GREEDY, Sampling
from psjax.decoding.tree import Tree
from psjax.drafters.base import Drafter
from psjax.models.llama import Transformer

OVERALL = "overall"
BASELINE = "ar"
PSJAX_METHODS = ("ar", "pld", "pld_tree", "sps", "parallelspec", "parallelspec_tree",
                 "parallelspec_lookup")
HF_METHODS = ("hf_generate", "hf_static_compiled", "hf_pld", "hf_assisted")
METHODS = PSJAX_METHODS + HF_METHODS
_PS_CHAIN = re.compile(r"parallelspec_k([1-9]\d*)")  # parallelspec_k4: a chain of 4 drafts
_AR_ROWS = re.compile(r"ar_rows([1-9]\d*)")  # ar_rows9: autoregressive, steps of 9 rows
# parallelspec_lookup_n8: the 8-node tree of --ps_lookup_tree's design_tree.py file (tree sizes
# side by side; parallelspec_tree_nN likewise from --ps_tree's)
_PS_SIZED = re.compile(r"(parallelspec_tree|parallelspec_lookup)_n([1-9]\d*)")
# parallelspec_lookup_v32768: the drafter proposes from its 32,768 most frequent answer tokens
# (psjax.drafters.draft_vocab); after any parallelspec name
_PS_VOCAB = re.compile(r"(parallelspec\w*?)_v([1-9]\d*)")
NAMING = ("parallelspec_kN (a chain of N drafts), parallelspec_tree_nN and "
          "parallelspec_lookup_nN (the N-node tree of --ps_tree's / --ps_lookup_tree's "
          "design_tree.py file), any of those + _vN (drafts from the drafter's N most frequent "
          "tokens, experiments/draft_vocab.py), ar_rowsN (autoregressive, each step a pass of N "
          "rows)")


def ar_rows(name: str) -> int | None:
    """N for `ar_rowsN` (autoregressive decoding, each step a pass of N rows), else None."""
    match = _AR_ROWS.fullmatch(name)
    return int(match.group(1)) if match else None


def draft_vocab(name: str) -> tuple[str, int | None]:
    """(the method without its _vN suffix, N), or (name, None) without one."""
    match = _PS_VOCAB.fullmatch(name)
    return (match.group(1), int(match.group(2))) if match else (name, None)


def is_known(name: str) -> bool:
    name = draft_vocab(name)[0]
    return (name in METHODS or _PS_CHAIN.fullmatch(name) is not None
            or _PS_SIZED.fullmatch(name) is not None or ar_rows(name) is not None)
MISMATCH_GAP = 0.05


# ---------------------------------------------------------------- methods

@dataclasses.dataclass
class TurnResult:
    tokens: list[int]  # generated tokens, EOS included where it stopped the turn
    seconds: float  # wall time between device synchronisations
    accepted: list[int] | None = None  # tokens committed per target step (psjax speculative)
    forwards: int | None = None  # target forward calls (transformers' assisted generation)


class Method:
    """One decoding method as the evaluation drives it: set up once, then one call per turn."""

    name: str
    min_warmup: int = 0  # untimed runs it needs at least (cudagraph capture needs 2)

    def setup(self, prompts: Sequence[Sequence[int]]) -> None:
        """Loads what it needs; `prompts` are all it will see (empty for the baseline, which
        makes the second-turn prompts as it goes)."""

    def shape_key(self, prompt: Sequence[int]) -> Hashable | None:
        """What its compiled code specialises on: a new key gets one untimed run first."""
        return None

    def generate(self, prompt: Sequence[int]) -> TurnResult:
        raise NotImplementedError

    def close(self) -> None:
        """Frees its models."""


class PsjaxMethod(Method):
    """psjax's autoregressive loop (no drafter; its steps passes of `step_rows` rows, None:
    `autoregressive.default_step_rows`) or its speculative engine."""

    def __init__(self, name: str, module: Transformer, params, *, max_new_tokens: int,
                 eos_ids: Sequence[int], sampling: Sampling = GREEDY,
                 drafter: Drafter | None = None, drafter_params=None, tree: Tree | None = None,
                 pad_id: int = 0, prompt_width: int | Sequence[int] | None = None,
                 step_rows: int | None = None):
        if (drafter is None) != (tree is None):
            raise ValueError("a speculative method needs both a drafter and a tree")
        if drafter is not None and step_rows is not None:
            raise ValueError("step_rows shapes autoregressive steps; a speculative method's "
                             "passes have its tree's rows")
        self.name, self.module, self.params = name, module, params
        self.max_new_tokens, self.eos_ids, self.sampling = max_new_tokens, tuple(eos_ids), sampling
        self.drafter, self.drafter_params, self.tree = drafter, drafter_params, tree
        self.pad_id, self.prompt_width, self.step_rows = pad_id, prompt_width, step_rows

    def shape_key(self, prompt):
        # The jit specialises on the padded prompt width (a power of two, or the one of
        # prompt_width that fits); the cache length follows from it.
        return common.pad_prompts([prompt], self.pad_id, self.prompt_width)[0].shape[1]

    def generate_batch(self, prompts: Sequence[Sequence[int]], rng: jax.Array | None = None
                       ) -> tuple[common.Generation, float]:
        """A batch in one call: (its Generation, seconds until its tokens are on the host)."""
        kw = dict(max_new_tokens=self.max_new_tokens, sampling=self.sampling,
                  eos_ids=self.eos_ids, pad_id=self.pad_id, prompt_width=self.prompt_width,
                  rng=rng)
        if self.drafter is None:
            return timed(autoregressive.generate, self.module, self.params, prompts,
                         step_rows=self.step_rows, **kw)
        return timed(speculative.generate, self.module, self.params, prompts,
                     drafter=self.drafter, drafter_params=self.drafter_params, tree=self.tree,
                     **kw)

    def generate(self, prompt):
        out, seconds = self.generate_batch([prompt])
        accepted = None if out.accepted is None else out.accepted[:, 0].tolist()
        return TurnResult(out.sequences()[0], seconds, accepted)


class HFMethod(Method):
    """A transformers baseline (psjax.bench.hf_baselines); the method name is the variant."""

    def __init__(self, name: str, hf_dir: str, dtype: str, *, max_new_tokens: int,
                 eos_ids: Sequence[int], pad_id: int, sampling: Sampling = GREEDY,
                 prompt_lookup_num_tokens: int = 10, assistant_dir: str | None = None):
        if name not in hf_baselines.VARIANTS:
            raise ValueError(f"unknown transformers method {name!r}")
        self.name, self.hf_dir, self.dtype = name, hf_dir, dtype
        self.max_new_tokens, self.eos_ids, self.pad_id = max_new_tokens, tuple(eos_ids), pad_id
        self.sampling, self.pld_k, self.assistant_dir = sampling, prompt_lookup_num_tokens, \
            assistant_dir
        self.min_warmup = 2 if "static" in name else 0
        self.counts_forwards = name in ("hf_pld", "hf_assisted")
        self.model = self.assistant = self.kwargs = None

    def setup(self, prompts):
        self.model = hf_baselines.load_model(self.hf_dir, self.dtype)
        if self.name == "hf_assisted":
            self.assistant = hf_baselines.load_model(self.assistant_dir, self.dtype)
        longest = max((len(p) for p in prompts), default=0)
        cache_length = 256 * -(-(longest + self.max_new_tokens) // 256)  # one static shape
        s = self.sampling
        self.kwargs = hf_baselines.generate_kwargs(
            self.name, self.model, max_new_tokens=self.max_new_tokens, pad_id=self.pad_id,
            eos_ids=self.eos_ids, cache_length=cache_length,
            prompt_lookup_num_tokens=self.pld_k, assistant_model=self.assistant,
            temperature=s.temperature, top_k=s.top_k, top_p=s.top_p)

    def generate(self, prompt):
        counter = (hf_baselines.ForwardCounter(self.model) if self.counts_forwards
                   else contextlib.nullcontext())
        with counter:
            out, seconds = timed(hf_baselines.generate, self.model, [list(prompt)], self.kwargs,
                                 self.pad_id)
        tokens = hf_baselines.trim_at_eos(out[0], self.eos_ids)
        return TurnResult(tokens, seconds,
                          forwards=counter.count if self.counts_forwards else None)

    def close(self):
        self.model = self.assistant = self.kwargs = None
        hf_baselines.release()


def pld_tree(k: int, width: int) -> Tree:
    """`width` chains of k drafts side by side: chain r follows the r-th most recent n-gram match
    (prompt lookup's rank-r candidate at every depth comes from match r)."""
    return Tree.from_paths((r,) * d for r in range(width) for d in range(1, k + 1))


@dataclasses.dataclass(frozen=True)
class Options:
    """How experiments/eval_specbench.py's flags configure the methods."""

    max_new_tokens: int = 1024
    dtype: str = "bfloat16"
    sampling: Sampling = GREEDY
    pld_k: int = 10  # psjax prompt lookup: chain length
    pld_tree_width: int = 3  # pld_tree: chains side by side
    sps_k: int = 4
    ps_k: int = 0  # parallelspec chain length; 0 = all the drafter's drafts (k masks + 1)
    ps_tree: Tree = Tree.from_branching((4, 2, 2, 1))  # parallelspec_tree's tree
    ps_lookup_tree: Tree = Tree.from_branching((4, 2, 2, 1))  # parallelspec_lookup's tree
    # design_tree.py files the _nN methods take their trees from (--ps_tree's and
    # --ps_lookup_tree's when those are FILE.json:N)
    ps_tree_file: str | None = None
    ps_lookup_tree_file: str | None = None
    hf_pld_k: int = 10  # transformers' prompt_lookup_num_tokens
    draft_dir: str | None = None  # draft model (sps, hf_assisted): an HF directory
    drafter_dir: str | None = None  # trained ParallelSpec drafter directory
    # psjax: padded prompt width(s): one fixed width, or the smallest of several that fits
    # (one compilation each); None: powers of 2
    prompt_width: int | tuple[int, ...] | None = None


def pad_id_of(target) -> int:
    pad_id = target.tokenizer.pad_token_id if target.tokenizer is not None else None
    return (target.eos_ids or (0,))[0] if pad_id is None else pad_id


def make_methods(names: Sequence[str], target, hf_dir: str, opts: Options
                 ) -> tuple[list[Method], dict[str, str]]:
    """The methods to run, in order, and {name: why} for those that cannot run here."""
    from psjax.convert.drafter_hf import load_drafter
    from psjax.drafters.draft_model import DraftModel
    from psjax.drafters.prompt_lookup import PromptLookup
    from psjax.drafters.with_lookup import WithPromptLookup
    from psjax.models.target import DTYPES, load_target

    unknown = [n for n in names if not is_known(n)]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; known: {list(METHODS)}, {NAMING}")
    eos, pad = target.eos_ids, pad_id_of(target)
    psjax_kw = dict(max_new_tokens=opts.max_new_tokens, eos_ids=eos, sampling=opts.sampling,
                    pad_id=pad, prompt_width=opts.prompt_width)
    methods, skipped = [], {}
    draft = None
    drafters = {}  # draft vocabulary size (None: all) -> the loaded drafter and its params
    for name in names:
        if name in ("sps", "hf_assisted") and not opts.draft_dir:
            raise ValueError(f"{name} needs a draft model (--draft)")
        if name.startswith("parallelspec") and not opts.drafter_dir:
            raise ValueError(f"{name} needs a trained ParallelSpec drafter (--drafter)")
        if name == "ar" or ar_rows(name):
            methods.append(PsjaxMethod(name, target.module, target.params,
                                       step_rows=ar_rows(name), **psjax_kw))
        elif name in ("pld", "pld_tree"):
            tree = (Tree.chain(opts.pld_k) if name == "pld"
                    else pld_tree(opts.pld_k, opts.pld_tree_width))
            methods.append(PsjaxMethod(name, target.module, target.params, drafter=PromptLookup(),
                                       tree=tree, **psjax_kw))
        elif name == "sps":
            draft = draft or load_target(opts.draft_dir, dtype=opts.dtype, tokenizer=False)
            methods.append(PsjaxMethod(name, target.module, target.params,
                                       drafter=DraftModel(draft.module),
                                       drafter_params=draft.params, tree=Tree.chain(opts.sps_k),
                                       **psjax_kw))
        elif name.startswith("parallelspec"):
            base, vocab = draft_vocab(name)
            tree = parallelspec_tree(base, opts)
            if vocab not in drafters:
                drafters[vocab] = load_drafter(opts.drafter_dir, target, DTYPES[opts.dtype],
                                               draft_vocab=vocab)
            drafter = drafters[vocab]
            lookup = name.startswith("parallelspec_lookup")
            methods.append(PsjaxMethod(
                name, target.module, target.params,
                drafter=WithPromptLookup(drafter[0]) if lookup else drafter[0],
                drafter_params=drafter[1],
                tree=Tree.chain(drafter[0].max_depth) if tree is None else tree,
                **psjax_kw))
        else:
            if name == "hf_assisted" and not hf_baselines.same_tokenizer(hf_dir, opts.draft_dir):
                skipped[name] = f"the draft model {opts.draft_dir} has another tokenizer"
                continue
            methods.append(HFMethod(name, hf_dir, opts.dtype, max_new_tokens=opts.max_new_tokens,
                                    eos_ids=eos, pad_id=pad, sampling=opts.sampling,
                                    prompt_lookup_num_tokens=opts.hf_pld_k,
                                    assistant_dir=opts.draft_dir))
    return methods, skipped


def tree_options(ps_tree: str, ps_lookup_tree: str = "") -> dict:
    """Options' tree fields from the --ps_tree and --ps_lookup_tree flags (branching or
    FILE.json:N; an empty --ps_lookup_tree is --ps_tree's)."""
    ps_lookup_tree = ps_lookup_tree or ps_tree
    return dict(ps_tree=Tree.parse(ps_tree), ps_lookup_tree=Tree.parse(ps_lookup_tree),
                ps_tree_file=Tree.designed_file(ps_tree),
                ps_lookup_tree_file=Tree.designed_file(ps_lookup_tree))


def parallelspec_tree(name: str, opts: Options) -> Tree | None:
    """The tree a parallelspec method verifies; None for `parallelspec` with --ps_k 0 (a chain
    of all the drafter's drafts, known once it is loaded)."""
    chain, sized = _PS_CHAIN.fullmatch(name), _PS_SIZED.fullmatch(name)
    if name == "parallelspec":
        return Tree.chain(opts.ps_k) if opts.ps_k else None
    if chain:
        return Tree.chain(int(chain.group(1)))
    if sized:
        lookup = sized.group(1) == "parallelspec_lookup"
        path = opts.ps_lookup_tree_file if lookup else opts.ps_tree_file
        if not path:
            raise ValueError(f"{name} takes a tree of a design_tree.py file: give "
                             f"{'--ps_lookup_tree' if lookup else '--ps_tree'} as FILE.json:N")
        return Tree.parse(f"{path}:{sized.group(2)}")
    return opts.ps_lookup_tree if name == "parallelspec_lookup" else opts.ps_tree


# ---------------------------------------------------------------- the float32 referee

def _top2(module: Transformer, params, tokens, lengths):
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    out = module.apply({"params": params}, tokens, positions, logits_at=lengths - 1)
    return jax.lax.top_k(out.logits[:, 0].astype(jnp.float32), 2)


_top2_jit = jax.jit(_top2, static_argnums=0)  # the module is hashable


class Float32Judge:
    """Tells a real mismatch from a near-tie: the float32 target's top-2 logit gap at the first
    position where two outputs part. `load` returns (module, params) in float32; it is called
    once, when the first divergence needs it.

    A divergence is a mismatch when gap > `threshold`. bfloat16 logits are rounded to a spacing
    of 2^-7 of their magnitude (0.25 at a logit of 32), far coarser than 0.05, so a bfloat16 run
    parts from the baseline at f32 gaps of that size; `ulps` > 0 widens the threshold to that
    many spacings of the run's dtype at the top logit (0: the plain threshold)."""

    def __init__(self, load: Callable[[], tuple[Transformer, object]],
                 threshold: float = MISMATCH_GAP, run_dtype=jnp.float32, ulps: float = 0.0):
        self._load, self.threshold, self._model = load, threshold, None
        self.eps, self.ulps = float(jnp.finfo(run_dtype).eps), ulps

    def gap(self, context: Sequence[int]) -> dict:
        """For the token after `context`: gap (top-1 minus top-2 float32 logit), the float32
        top-1 token, gap_ulps (the gap in spacings of the run's dtype at the top logit) and
        mismatch (the verdict)."""
        if self._model is None:
            self._model = self._load()
        module, params = self._model
        tokens, lengths = common.pad_prompts([context])
        with jax.default_matmul_precision("highest"):  # GPUs default to TF32 for float32
            values, ids = _top2_jit(module, params, jnp.asarray(tokens), jnp.asarray(lengths))
        values, ids = np.asarray(values)[0], np.asarray(ids)[0]
        gap = float(values[0] - values[1])
        spacing = self.eps * 2.0 ** math.floor(math.log2(max(abs(float(values[0])), 1e-30)))
        return dict(gap=gap, float32_token=int(ids[0]), gap_ulps=gap / spacing,
                    mismatch=gap > max(self.threshold, self.ulps * spacing))


def first_difference(a: Sequence[int], b: Sequence[int]) -> int | None:
    """The first index where two token lists differ (a length difference counts), or None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


# ---------------------------------------------------------------- the run

def evaluate(questions: Sequence[dict], methods: Sequence[Method], *,
             prompt_fn: Callable[[list[str], list[str]], list[int]],
             decode: Callable[[list[int]], str], judge: Float32Judge | None,
             warmup: int = 1, check: bool = True, keep_text: str = "all",
             reference: str = BASELINE, interleave: bool = False,
             log: Callable[[str], None] = print,
             on_progress: Callable[[list[dict], dict], None] | None = None,
             progress_every: int = 20) -> tuple[list[dict], dict[str, str]]:
    """Runs every method over every turn of every question -> (per-turn records, {method: error}
    for methods that failed; their records are dropped and the rest go on).

    `questions`: dicts with question_id, category (a Spec-Bench display name) and turns.
    `prompt_fn(user_turns, assistant_turns)` -> prompt token ids (the chat template);
    `decode(tokens)` -> text. methods[0] must be the baseline `ar`: it runs first and its first
    answers condition every method's second turns. `check`: compare with the reference (greedy
    only): the baseline, or `reference`, an ar_rowsN method that must run second (it is checked
    against the baseline; the methods after it against it). `keep_text`: "all", or "diverged"
    (a method's text only where it parts from the reference's; the baseline's always).
    `on_progress(records, failures)`: called with what is done so far after each method, or
    every `progress_every` questions when interleaved, so a run cut short keeps its part.

    `interleave`: by default each method runs over all questions before the next starts, as
    Spec-Bench does; a machine that slows down during a run (an H200 took 4-13% longer for the
    same verify step two minutes later, results/specbench_qwen05b_h200_56t_draft_vocab/) then
    favours the methods that run first. Interleaved, the baseline runs alone first (its records
    are dropped: it makes the prompts and the reference), then every method, the baseline again
    among them (checked against its first run), runs each turn in turn, all set up at once."""
    if not methods or methods[0].name != BASELINE:
        raise ValueError(f"the first method must be the baseline {BASELINE!r}")
    if reference != BASELINE and (ar_rows(reference) is None or len(methods) < 2
                                  or methods[1].name != reference):
        raise ValueError(f"reference {reference!r}: the reference is {BASELINE!r} or an "
                         "ar_rowsN method run right after it")
    if keep_text not in ("all", "diverged"):
        raise ValueError(f"keep_text must be 'all' or 'diverged', got {keep_text!r}")
    if check and judge is None:
        raise ValueError("checking against the baseline needs a Float32Judge")
    run = _Run({}, {}, {}, prompt_fn=prompt_fn, decode=decode, judge=judge, check=check,
               keep_text=keep_text, reference=reference, log=log)
    if interleave:
        run.baseline_alone(methods[0], questions, warmup)
        return run.interleaved(methods, questions, warmup, on_progress, progress_every)
    records = []
    for method in methods:
        try:
            rows = run.isolated(method, lambda m=method: (
                run.baseline_alone(m, questions, warmup) if m.name == BASELINE else
                run.one_method(m, questions, warmup)))
        finally:
            method.close()
        if rows is not None:
            records.extend(rows)
            if on_progress is not None:
                on_progress(records, run.failures)
    return records, run.failures


@dataclasses.dataclass
class _Run:
    """One evaluation's shared state: the prompts the baseline made (keyed by (question id,
    turn)), the tokens each turn is checked against, the methods that failed, and how turns are
    checked and logged."""

    prompts: dict[tuple[int, int], list[int]]
    reference_tokens: dict[tuple[int, int], list[int]]
    failures: dict[str, str]
    prompt_fn: Callable
    decode: Callable
    judge: Float32Judge | None
    check: bool
    keep_text: str
    reference: str
    log: Callable[[str], None]

    def prepare(self, method: Method, questions, warmup: int) -> set:
        """Sets `method` up and warms it on the first prompt -> the shapes it has compiled."""
        method.setup(list(self.prompts.values()))  # none yet for the baseline alone
        first = self.prompts.get((questions[0]["question_id"], 1)) or self.prompt_fn(
            list(questions[0]["turns"][:1]), [])
        for _ in range(max(warmup, method.min_warmup)):
            method.generate(first)
        return {method.shape_key(first)}

    def baseline_alone(self, method: Method, questions, warmup: int) -> list[dict]:
        """The baseline over every question: it makes the prompts (its answers condition the
        second turns) and the tokens the others are checked against."""
        seen = self.prepare(method, questions, warmup)
        rows = []
        for q in questions:
            answers = []
            for t in range(len(q["turns"])):
                self.prompts[(q["question_id"], t + 1)] = self.prompt_fn(
                    list(q["turns"][:t + 1]), list(answers))
                row = self.turn(method, q, t, seen, check=False)
                answers.append(row["text"])
                rows.append(row)
        return rows

    def one_method(self, method: Method, questions, warmup: int) -> list[dict]:
        seen = self.prepare(method, questions, warmup)
        return [self.turn(method, q, t, seen, check=self.check)
                for q in questions for t in range(len(q["turns"]))]

    def interleaved(self, methods: Sequence[Method], questions, warmup: int, on_progress,
                    progress_every: int) -> tuple[list[dict], dict[str, str]]:
        live, seen, rows = list(methods), {}, {m.name: [] for m in methods}

        def step(method, fn):  # a failed method leaves the run; the rest go on
            out = self.isolated(method, fn)
            if out is None:
                live.remove(method)
                method.close()
            return out

        for method in list(live):
            seen[method.name] = step(method, lambda m=method: self.prepare(m, questions, warmup))

        def records():
            return [r for m in live for r in rows[m.name]]

        for i, q in enumerate(questions, 1):
            for t in range(len(q["turns"])):
                for method in list(live):
                    row = step(method, lambda m=method: self.turn(m, q, t, seen[m.name],
                                                                  check=self.check))
                    if row is not None:
                        rows[method.name].append(row)
            if on_progress is not None and (i % progress_every == 0 or i == len(questions)):
                on_progress(records(), self.failures)
        for method in live:
            method.close()
        return records(), self.failures

    def isolated(self, method: Method, fn: Callable):
        """fn() -> its value, or None if it raised: one method's failure must not stop the rest,
        so it is logged and kept in `failures` (the baseline's and the reference's raise)."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            if method.name in (BASELINE, self.reference):
                raise
            self.log(f"[{method.name}] FAILED:\n{traceback.format_exc()}")
            self.failures[method.name] = f"{type(e).__name__}: {e}".replace("\n", " ")
            return None

    def turn(self, method: Method, q: dict, t: int, seen: set, *, check: bool) -> dict:
        """One timed turn of `method` (its shape compiled first, untimed) -> its record."""
        key = (q["question_id"], t + 1)
        prompt = self.prompts[key]
        baseline = method.name == BASELINE
        shape = method.shape_key(prompt)
        if shape is not None and shape not in seen:
            method.generate(prompt)  # compiles: untimed
            seen.add(shape)
        out = method.generate(prompt)
        text = self.decode(out.tokens)
        row = dict(question_id=q["question_id"], category=q["category"], turn=t + 1,
                   method=method.name, tokens=len(out.tokens), seconds=out.seconds,
                   tokens_per_s=len(out.tokens) / out.seconds, accepted=out.accepted,
                   forwards=out.forwards, text=text, diverged=False, mismatch=False)
        if check:
            row.update(_check(prompt, out.tokens, self.reference_tokens[key], self.judge))
        elif not baseline:
            row.update(diverged=None, mismatch=None)
        if baseline or method.name == self.reference:  # an ar_rowsN one after its own check
            self.reference_tokens[key] = out.tokens
        if self.keep_text == "diverged" and not baseline and not row["diverged"]:
            row["text"] = None
        tau = (f", tau {np.mean(out.accepted):.2f}" if out.accepted else
               f", tau {len(out.tokens) / out.forwards:.2f}" if out.forwards else "")
        flag = (" MISMATCH" if row["mismatch"] else " diverged (near-tie)"
                if row["diverged"] else "")
        self.log(f"[{method.name}] q{q['question_id']} turn {t + 1}: {row['tokens']} tokens, "
                 f"{out.seconds:.3f} s, {row['tokens_per_s']:.1f} tok/s{tau}{flag}")
        return row


def _check(prompt, tokens, ref, judge) -> dict:
    at = first_difference(tokens, ref)
    if at is None:
        return dict(diverged=False, mismatch=False)
    return dict(diverged=True, diverged_at=at, token=tokens[at] if at < len(tokens) else None,
                baseline_token=ref[at] if at < len(ref) else None,
                **judge.gap(list(prompt) + list(ref[:at])))


# ---------------------------------------------------------------- the report

def summarize(records: Sequence[dict], *, card: str, target: str, command: str,
              date: str | None = None, failures: dict[str, str] | None = None,
              settings: dict | None = None) -> dict:
    """summary.json: per method, per category (and overall): speedup over `ar`, tau, tokens/s,
    divergences and mismatches (None when not checked); `settings` (what the command line does
    not show, e.g. the attention form a default resolved to) recorded as given."""
    per_q: dict[str, dict[int, dict]] = {}
    for r in records:
        q = per_q.setdefault(r["method"], {}).setdefault(r["question_id"], dict(
            category=r["category"], tokens=0, seconds=0.0, accepted=[], forwards=0,
            divergences=0, mismatches=0, checked=True))
        q["tokens"] += r["tokens"]
        q["seconds"] += r["seconds"]
        q["accepted"] += r["accepted"] or []
        q["forwards"] += r["forwards"] or 0
        if r["diverged"] is None:
            q["checked"] = False
        else:
            q["divergences"] += int(r["diverged"])
            q["mismatches"] += int(bool(r["mismatch"]))
    if BASELINE not in per_q:
        raise ValueError(f"no records of the baseline {BASELINE!r}")
    present = {q["category"] for q in per_q[BASELINE].values()}
    columns = [c for c in CATEGORIES if c in present] + [OVERALL]

    def group(method, column):
        return [q for q in per_q[method].values() if column in (OVERALL, q["category"])]

    def speed(qs):
        return float(np.mean([q["tokens"] / q["seconds"] for q in qs]))

    methods = {}
    for method in per_q:  # insertion order: the run's order
        methods[method] = {}
        for column in columns:
            qs = group(method, column)
            if not qs:
                continue
            accepted = [a for q in qs for a in q["accepted"]]
            forwards = sum(q["forwards"] for q in qs)
            if accepted:
                tau = float(np.mean(accepted))
            elif forwards:
                tau = sum(q["tokens"] for q in qs) / forwards
            else:
                tau = 1.0
            checked = all(q["checked"] for q in qs)
            methods[method][column] = dict(
                speedup=_round(speed(qs) / speed(group(BASELINE, column))), tau=_round(tau),
                tokens_per_s=_round(speed(qs)),
                divergences=sum(q["divergences"] for q in qs) if checked else None,
                mismatches=sum(q["mismatches"] for q in qs) if checked else None)
    summary = dict(card=card, date=date or today(), target=target,
                   command=command, methods=methods)
    if settings:
        summary["settings"] = dict(settings)
    if failures:
        summary["failed"] = dict(failures)
    return summary


def _round(x: float) -> float:
    return round(float(x), 4)


def markdown_table(summary: dict) -> str:
    """The leaderboard layout: method rows; speedup per category, then overall speedup, tau,
    tokens/s and mismatches (divergences in brackets)."""
    methods = summary["methods"]
    columns = [c for c in CATEGORIES if any(c in m for m in methods.values())]
    lines = [f"Spec-Bench, {summary['target']}, {summary['card']}, {summary['date']} "
             f"(speedup over `{BASELINE}`)", "",
             "| method | " + " | ".join(columns) + " | overall | tau | tok/s | mismatches "
             "(divergences) |", "|" + " --- |" * (len(columns) + 5)]
    for name, stats in methods.items():
        cells = [f"{stats[c]['speedup']:.2f}x" if c in stats else "-" for c in columns]
        o = stats[OVERALL]
        checked = "-" if o["mismatches"] is None else f"{o['mismatches']} ({o['divergences']})"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {o['speedup']:.2f}x | "
                     f"{o['tau']:.2f} | {o['tokens_per_s']:.1f} | {checked} |")
    for name, why in summary.get("failed", {}).items():
        lines.append(f"| {name} | failed: {why[:150]} |")
    return "\n".join(lines)


def plot_chart(summary: dict, path: str) -> None:
    """Grouped bars: speedup per category (and overall), one bar per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = {k: v for k, v in summary["methods"].items() if k != BASELINE}
    columns = [c for c in CATEGORIES if c in summary["methods"][BASELINE]] + [OVERALL]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(columns)), 4.5))
    width = 0.8 / max(1, len(methods))
    x = np.arange(len(columns))
    for i, (name, stats) in enumerate(methods.items()):
        values = [stats.get(c, {}).get("speedup", math.nan) for c in columns]
        ax.bar(x - 0.4 + width * (i + 0.5), values, width, label=name)
    ax.axhline(1.0, color="black", linestyle="--", linewidth=1, label=f"{BASELINE} (1.0)")
    ax.set_xticks(x, [c.replace(" ", "\n", 1) for c in columns], fontsize=8)
    ax.set_ylabel(f"speedup over {BASELINE}")
    ax.set_title(f"Spec-Bench: {summary['target']} on {summary['card']} ({summary['date']})",
                 fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(out_dir: str, records: Sequence[dict], summary: dict) -> str:
    """questions.jsonl, summary.json and chart.png under out_dir; returns the markdown table."""
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "questions.jsonl"), "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    plot_chart(summary, os.path.join(out_dir, "chart.png"))
    return markdown_table(summary)
