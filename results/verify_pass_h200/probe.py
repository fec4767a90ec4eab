"""Where a verify pass's time grows with T: the target's pass over T tokens against a cache of 800
slots (600 committed), and its LM head alone in four forms, tied and untied, at Qwen2.5-0.5B
shapes, random bfloat16 weights; median of 40 calls of one jitted function each (launch
overhead included: compare within a row, not with a step of the loop). On the GPU, from the
repository root (probe_default.json; probe_no_triton.json adds
XLA_FLAGS=--xla_gpu_enable_triton_gemm=false):

    PYTHONPATH=.:/tmp/site python3 results/verify_pass_h200/probe.py OUT.json

PROBE_QUICK=1: T in (1, 17) and 2 calls (a CPU smoke run)."""
import dataclasses, json, os, sys, time
import jax, jax.numpy as jnp, numpy as np
from psjax.bench import limits
from psjax.models.kv_cache import KVCache
from psjax.models.target import random_target

def timed(f, *args, n=2 if os.environ.get("PROBE_QUICK") else 40):
    jax.block_until_ready(f(*args))
    ts = []
    for _ in range(n):
        t0 = time.perf_counter(); jax.block_until_ready(f(*args)); ts.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(ts)), 4)

out = {"card": jax.devices()[0].device_kind, "xla_flags": os.environ.get("XLA_FLAGS", ""), "pass": {}, "head": {}}
Ts = (1, 17) if os.environ.get("PROBE_QUICK") else (1, 3, 5, 9, 17, 33, 65)
base = limits.shape_config("qwen2.5-0.5b")
S, L = 800, 600
for tied in (True, False):
    cfg = dataclasses.replace(base, tie_word_embeddings=tied)
    tgt = random_target(cfg, dtype="bfloat16", fused=True)
    cache = KVCache.create(cfg, 1, S)
    cache = cache.replace(lengths=jnp.array([L], jnp.int32))
    @jax.jit
    def verify(params, tokens, cache):
        t = tokens.shape[1]
        pos = L + jnp.arange(t)[None]
        o = tgt.module.apply({"params": params}, tokens, pos, cache,
                             jnp.tril(jnp.ones((1, t, t), bool)))
        return o.logits.argmax(-1), o.cache.k[0]
    row = {}
    for t in Ts:
        row[t] = timed(verify, tgt.params, jnp.ones((1, t), jnp.int32), cache)
    out["pass"]["tied" if tied else "untied"] = row
    print(json.dumps({"pass_tied" if tied else "pass_untied": row}), flush=True)
    del tgt

V, D = base.vocab_size, base.hidden_size
key = jax.random.PRNGKey(0)
W = jax.random.normal(key, (D, V), jnp.bfloat16) * 0.02
E = jax.random.normal(key, (V, D), jnp.bfloat16) * 0.02
def pad64(f):
    def g(x, w):
        m = x.shape[0]
        return f(jnp.pad(x, ((0, 64 - m), (0, 0))), w)[:m]
    return g
variants = {
    "untied_f32": lambda x, w: jnp.einsum("td,dv->tv", x, w, preferred_element_type=jnp.float32),
    "tied_f32": lambda x, e: jnp.einsum("td,vd->tv", x, e, preferred_element_type=jnp.float32),
    "untied_bf16": lambda x, w: jnp.einsum("td,dv->tv", x, w),
    "tied_bf16": lambda x, e: jnp.einsum("td,vd->tv", x, e),
}
variants["untied_f32_pad64"] = pad64(variants["untied_f32"])
variants["tied_f32_pad64"] = pad64(variants["tied_f32"])
for name, f in variants.items():
    w = E if name.startswith("tied") else W
    g = jax.jit(lambda x, w, f=f: f(x, w).argmax(-1))
    row = {t: timed(g, jnp.ones((t, D), jnp.bfloat16), w) for t in Ts if t <= 64}
    out["head"][name] = row
    print(json.dumps({name: row}), flush=True)
json.dump(out, open(sys.argv[1] if len(sys.argv) > 1 else "/tmp/probe.json", "w"), indent=1)
