"""Probe (GPU): where a speculative step's time goes at batch 8 and at temperature 1 (random
weights of the 0.5B's shape; steps cost what real ones do). For each case, one program compiled
once: wall ms per step (a call's median over its steps, the prompt pass spread over them) and,
with TRACE=1, a device trace split by phase (draft / verify / accept / commit; unattributed:
library kernels). From the repository root:

    PYTHONPATH=.:/tmp/site TRACE=1 python3 results/profile_h200_batch8_temperature1/probe_b8.py OUT.json

CASES picks the cases (ar1 = autoregressive batch 1, lk8_8 = prompt lookup in front of a k = 3
drafter, the 8-node tree, batch 8; a trailing t = temperature 1), NEW the tokens per call.
steps_820610a.json: eight cases at 820610a; steps_temperature1_one_draw.json: the three
temperature-1 cases after sampling's acceptance became one draw per node (2aa4830)."""
import json, os, statistics, sys, time
import jax, jax.numpy as jnp, numpy as np
from psjax.bench import limits
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.sampling import GREEDY, Sampling
from psjax.decoding.tree import Tree
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models.target import random_target

target = random_target(limits.shape_config("qwen2.5-0.5b"), dtype="bfloat16", fused=True)
module, params = target.module, target.params
drafter, dparams = limits.random_drafter(module, 3, (2, 12, 24))
lookup = WithPromptLookup(drafter)
T = "results/tree_design_lookup_qwen05b_cpu/tree_lookup_decoded.json"
rng = np.random.default_rng(0)
WIDTH, NEW = 512, int(os.environ.get("NEW", 257))


def prompts(b):
    out = []
    for i in range(b):
        base = rng.integers(0, 150000, 60).tolist()
        out.append((base * 6)[:200 + 37 * i])
    return out


def med(fn, n=5):
    fn()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def compile_case(b, sampling, tree=None):
    """A case's program, compiled once, and a call of it: autoregressive decoding (tree None)
    or the lookup in front of the drafter with `tree` ("FILE.json:N"), b rows."""
    tokens, lengths = common.pad_prompts(prompts(b), 0, WIDTH)
    tokens, lengths, key = jnp.asarray(tokens), jnp.asarray(lengths), jax.random.PRNGKey(0)
    dtype = jnp.dtype(jnp.bfloat16)
    if tree is None:
        kw = dict(max_new_tokens=NEW, sampling=sampling, eos_ids=(), pad_id=0, cache_dtype=dtype,
                  cache_length=common.default_cache_length(WIDTH, NEW))
        compiled = autoregressive._generate.lower(module, params, tokens, lengths, key,
                                                  **kw).compile()
        run = lambda: jax.block_until_ready(compiled(params, tokens, lengths, key))
    else:
        t = Tree.parse(tree)
        lookahead = max(t.num_nodes + 1, lookup.cache_lookahead(t.max_depth))
        kw = dict(tree=t, max_new_tokens=NEW, sampling=sampling, eos_ids=(), cache_dtype=dtype,
                  cache_length=common.default_cache_length(WIDTH, NEW, lookahead))
        compiled = speculative._generate.lower(module, params, lookup, dparams, tokens, lengths,
                                               key, **kw).compile()
        run = lambda: jax.block_until_ready(compiled(params, dparams, tokens, lengths, key))
    return compiled, run


def case(name, b, sampling, tree=None):
    """Wall ms per step = the call's median / its steps (the prompt pass spread over them),
    then a device trace of the same program."""
    compiled, run = compile_case(b, sampling, tree)
    steps = int(run()[2])
    row = {"case": name, "batch": b, "temperature": sampling.temperature, "tree": tree,
           "steps": steps, "wall_ms_per_step": round(1e3 * med(run) / steps, 4)}
    if os.environ.get("TRACE"):
        text = compiled.as_text()
        tr = limits.device_trace(run, steps, hlo_text=lambda: text)
        row.update({k: tr.get(k) for k in ("kernels_per_step", "busy_ms_per_step",
                                           "phases_ms_per_step", "top_named_kernels_ms_per_step",
                                           "top_named_kernels_op")})
    print("ROW", json.dumps(row), flush=True)
    return row


T1 = Sampling(temperature=1.0)
SPEC = {"ar1": (1, GREEDY, None), "ar8": (8, GREEDY, None), "ar1t": (1, T1, None),
        "ar8t": (8, T1, None)}
for n in (8, 16):
    for b in (1, 8):
        SPEC[f"lk{n}_{b}"] = (b, GREEDY, f"{T}:{n}")
        SPEC[f"lk{n}_{b}t"] = (b, T1, f"{T}:{n}")

if __name__ == "__main__":
    cases = os.environ.get(
        "CASES", "ar1,ar8,lk8_1,lk16_1,lk8_8,lk16_8,ar1t,lk8_1t,lk16_1t,lk8_8t").split(",")
    rows = [case(c, *SPEC[c]) for c in cases]
    if len(sys.argv) > 1:
        json.dump(rows, open(sys.argv[1], "w"), indent=1)
