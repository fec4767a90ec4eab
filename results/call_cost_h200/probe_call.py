"""Probe: what one generate call costs besides its steps (Qwen2.5-0.5B shape, random bfloat16
weights, batch 1): the prompt pass alone, autoregressive calls of 1 and 65 tokens, and calls of
the prompt lookup in front of a random k = 3 drafter (8-node tree) of 1 and 65 tokens (a call of
1 token runs no speculative step), at prompt widths 512 and 2,048 with 1,024 slots of
generation behind them, as eval_specbench.py's calls have.

    PYTHONPATH=.:/tmp/site python3 results/call_cost_h200/probe_call.py LABEL ATTENTION

from the repository root; ATTENTION is the prompt pass's (Transformer.uncached_attention:
einsum, xla, cudnn); LABEL names the code under test (PYTHONPATH decides which psjax runs).
Prints one JSON line per width, then everything with a profiler trace of a 1-token call."""
import json, statistics, sys
import jax, jax.numpy as jnp, numpy as np
from psjax.bench import limits
from psjax.bench.timing import timed
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.tree import Tree
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models.kv_cache import KVCache
from psjax.models.target import random_target

label, attention = sys.argv[1], sys.argv[2]
NEW = 1024
target = random_target(limits.shape_config("qwen2.5-0.5b"), dtype="bfloat16", fused=True)
module = target.module.clone(uncached_attention=attention)
params = target.params
drafter, dparams = limits.random_drafter(module, 3, (2, 12, 24))
lookup = WithPromptLookup(drafter)
tree = Tree.parse("results/tree_design_lookup_qwen05b_cpu/tree_lookup_decoded.json:8")
rng = np.random.default_rng(0)

def med(fn, n=7):
    fn(); fn()
    return 1e3 * statistics.median(timed(fn)[1] for _ in range(n))

@jax.jit
def trivial(x):
    return x + 1

out = {"label": label, "attention": attention, "card": jax.devices()[0].device_kind}
out["trivial_ms"] = med(lambda: np.asarray(trivial(jnp.int32(1))))

for width, plen in ((512, 300), (2048, 1500)):
    prompt = [rng.integers(0, 150000, plen).tolist()]
    tokens, lengths = common.pad_prompts(prompt, 0, width)
    tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
    ar_cache = width + NEW
    lookahead = max(tree.num_nodes + 1, lookup.cache_lookahead(tree.max_depth))
    spec_cache = width + NEW + lookahead

    @jax.jit
    def prefill(tokens, lengths):
        cache = KVCache.create(module.config, 1, ar_cache, jnp.bfloat16)
        return common.prefill(module, params, tokens, lengths, cache)[0]

    row = {"prefill_ms": med(lambda: np.asarray(prefill(tokens, lengths)))}
    for n in (1, 65):
        row[f"ar_{n}_ms"] = med(lambda: autoregressive.generate(
            module, params, prompt, max_new_tokens=n, cache_length=ar_cache,
            prompt_width=width))
        g = speculative.generate(module, params, prompt, drafter=lookup, drafter_params=dparams,
                                 tree=tree, max_new_tokens=n, cache_length=spec_cache,
                                 prompt_width=width)
        row[f"lookup_{n}_steps"] = g.steps
        row[f"lookup_{n}_ms"] = med(lambda: speculative.generate(
            module, params, prompt, drafter=lookup, drafter_params=dparams, tree=tree,
            max_new_tokens=n, cache_length=spec_cache, prompt_width=width))
    row["ar_step_ms"] = (row["ar_65_ms"] - row["ar_1_ms"]) / 64
    row["lookup_step_ms"] = (row["lookup_65_ms"] - row["lookup_1_ms"]) / (
        row["lookup_65_steps"] - row["lookup_1_steps"])
    if width == 512:
        row["trace_ar_1"] = limits.device_trace(lambda: autoregressive.generate(
            module, params, prompt, max_new_tokens=1, cache_length=ar_cache,
            prompt_width=width), steps=1)
    out[str(width)] = row
    print(json.dumps({width: {k: v for k, v in row.items() if not k.startswith("trace")}}),
          flush=True)
print(json.dumps(out))
