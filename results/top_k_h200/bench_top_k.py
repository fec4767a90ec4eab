"""XLA's TopK kernel (`jax.lax.top_k`) against psjax's `sampling.top_k` (k fused rounds of
argmax) where decoding calls them: a drafter's top-k candidates over the vocabulary at each of
its draft positions ([B, 4, 151936] float32 logits, Qwen2.5's vocabulary, k = 1..8), and prompt
lookup's latest matches over the sequence buffer ([B, 3, 2304] int32 scores, k = 1..3). Each
call runs 200 times in one jitted fori_loop, every iteration's input depending on the last
one's output (no hoisting); a loop with the dependency alone is subtracted. On the GPU:

    PYTHONPATH=.:/tmp/site python3 results/top_k_h200/bench_top_k.py OUT.json
"""
import json
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from psjax.decoding.sampling import top_k

N = 200


def per_call_ms(select, x, k):
    @jax.jit
    def run(x):
        def body(_, x):
            indices = select(x, k)[1]
            return jnp.where(indices[..., :1] < 0, x + 1, x)  # never true, not provably so
        return jax.lax.fori_loop(0, N, body, x)
    jax.block_until_ready(run(x))
    times = []
    for _ in range(5):
        start = time.perf_counter()
        jax.block_until_ready(run(x))
        times.append(time.perf_counter() - start)
    return 1e3 * float(np.median(times)) / N


def dependency_only(x, k):
    return x, jnp.zeros(x.shape[:-1] + (k,), jnp.int32)


rs = np.random.RandomState(0)
out = {"card": jax.devices()[0].device_kind, "jax": jax.__version__, "calls_per_loop": N,
       "rows": []}
cases = [("draft_logits", b, jnp.asarray(rs.randn(b, 4, 151936).astype(np.float32)), ks)
         for b in (1, 8) for ks in [(1, 2, 3, 4, 5, 6, 8)]]
cases += [("lookup_scores", b, jnp.asarray(rs.randint(-1, 2304, (b, 3, 2304)).astype(np.int32)),
           (1, 3)) for b in (1, 8)]
for name, b, x, ks in cases:
    for k in ks:
        base = per_call_ms(dependency_only, x, k)
        row = {"input": name, "shape": list(x.shape), "k": k,
               "lax_top_k_ms": per_call_ms(jax.lax.top_k, x, k) - base,
               "rounds_top_k_ms": per_call_ms(top_k, x, k) - base, "loop_only_ms": base}
        out["rows"].append(row)
        print(json.dumps(row), flush=True)
if len(sys.argv) > 1:
    with open(sys.argv[1], "w") as f:
        json.dump(out, f, indent=1)
