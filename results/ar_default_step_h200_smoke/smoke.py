import time, numpy as np, jax
from psjax.bench import limits
from psjax.models.target import random_target
from psjax.decoding import autoregressive as ar
t = random_target(limits.shape_config("qwen2.5-0.5b"), dtype="bfloat16")
p = [np.random.RandomState(0).randint(0, 1000, 400).tolist()]
print(jax.devices(), "default_step_rows(1..8):", [ar.default_step_rows(b) for b in (1, 2, 4, 8)], flush=True)
for rows in (None, 1, 2, 4, None, 1):
    kw = dict(max_new_tokens=512, step_rows=rows, prompt_width=512)
    ar.generate(t.module, t.params, p, **kw)
    ts = []
    for _ in range(3):
        s = time.perf_counter(); out = ar.generate(t.module, t.params, p, **kw); ts.append(time.perf_counter() - s)
    print(f"step_rows={rows}: {out.steps} steps, best {1e3*min(ts)/out.steps:.4f} ms/step (prefill in), all {[round(x,4) for x in ts]}", flush=True)
