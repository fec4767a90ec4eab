"""Probe (GPU): (1) `step`: which ops the speculative step's kernels run (the optimized HLO of
the lookup-in-front program: step_einsum.json / step_chunked.json, max_fusion_hlo.txt); (2)
`call`: what one generate call costs besides its steps (calls_512.json), and with a profiler
trace of a 1-token autoregressive call where its time goes (device kernels, gaps, host events).
Qwen2.5-0.5B shape, random bfloat16 weights, batch 1, a 300-token prompt padded to 512.

    PYTHONPATH=.:/tmp/site python3 results/profile_h200_verify_attention/probe_step.py step call

from the repository root; ATT=einsum|chunked|cudnn sets llama.MATMUL_ATTENTION, NO_TRACE=1
skips the trace, OUT (default /tmp) receives the HLO text and the hot fusions. The run at
70eccf8 ("before" in calls_512.json, step_einsum.json) passed its cache lengths explicitly
(512 + 1,024 [+ 11]); this version takes the decoding loops' default (whole 128-slot chunks)."""
import collections, glob, gzip, json, os, re, statistics, sys, tempfile, time
import jax, jax.numpy as jnp, numpy as np
from psjax.bench import limits
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.sampling import GREEDY
from psjax.decoding.tree import Tree
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models import llama
from psjax.models.target import random_target

llama.MATMUL_ATTENTION = os.environ.get("ATT", llama.MATMUL_ATTENTION)

OUT = os.environ.get("OUT", "/tmp")
which = sys.argv[1:] or ["step", "call"]
target = random_target(limits.shape_config("qwen2.5-0.5b"), dtype="bfloat16", fused=True)
module, params = target.module, target.params
drafter, dparams = limits.random_drafter(module, 3, (2, 12, 24))
lookup = WithPromptLookup(drafter)
tree = Tree.parse("results/tree_design_lookup_qwen05b_cpu/tree_lookup_decoded.json:8")
rng = np.random.default_rng(0)
base = rng.integers(0, 150000, 60).tolist()
prompt = [(base * 5)[:300]]  # repeats: the lookup finds matches
WIDTH, NEW = 512, 1024
tokens, lengths = common.pad_prompts(prompt, 0, WIDTH)
tokens, lengths = jnp.asarray(tokens), jnp.asarray(lengths)
lookahead = max(tree.num_nodes + 1, lookup.cache_lookahead(tree.max_depth))


def trace_events(fn):
    fn()
    logdir = tempfile.mkdtemp(prefix="probe_trace_")
    with jax.profiler.trace(logdir):
        fn()
    f = glob.glob(os.path.join(logdir, "**", "*.json.gz"), recursive=True)[0]
    with gzip.open(f, "rt") as fh:
        data = json.load(fh)
    ev = data["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e.get("ph") == "M" and e.get("name") == "process_name"}
    return ev, procs


def fused_computation(text, instr):
    m = re.search(r"^\s*(?:ROOT )?%" + re.escape(instr) + r" = .*$", text, re.M)
    if not m:
        return f"(no instruction {instr})"
    line = m.group(0)
    calls = re.search(r"calls=%([\w.\-]+)", line)
    body = ""
    if calls:
        b = re.search(r"^%" + re.escape(calls.group(1)) + r" .*?^}", text, re.M | re.S)
        body = b.group(0) if b else ""
    return line[:3000] + "\n" + body[:12000]


if "step" in which:
    kw = dict(tree=tree, max_new_tokens=NEW, sampling=GREEDY, eos_ids=(),
              cache_length=common.default_cache_length(WIDTH, NEW, lookahead), cache_dtype=jnp.dtype(jnp.bfloat16))
    args = (module, params, lookup, dparams, tokens, lengths, jax.random.PRNGKey(0))
    t0 = time.time()
    compiled = speculative._generate.lower(*args, **kw).compile()
    print("compile s", time.time() - t0, flush=True)
    text = compiled.as_text()
    open(f"{OUT}/lookup_step_hlo.txt", "w").write(text)
    run = lambda: jax.block_until_ready(compiled(params, dparams, tokens, lengths, jax.random.PRNGKey(0)))
    steps = int(run()[2])
    print("steps", steps, flush=True)
    tr = limits.device_trace(run, steps, hlo_text=lambda: text)
    print(json.dumps(tr, indent=1), flush=True)
    hot = [k for k in tr.get("top_named_kernels_ms_per_step", {}) if "reduce" in k or k.startswith("loop_")][:4]
    hot += sorted(set(n.replace(".", "_") for n in re.findall(r"%(input_reduce_select_fusion[\w.]*) = ", text)))
    with open(f"{OUT}/hot_fusions.txt", "w") as fh:
        for k in hot:
            instr = re.sub(r"_(\d+)$", r".\1", k)
            fh.write(f"===== {k}\n" + fused_computation(text, instr) + "\n")
    print(open(f"{OUT}/hot_fusions.txt").read()[:20000], flush=True)

if "call" in which:
    def ar1():
        return autoregressive.generate(module, params, prompt, max_new_tokens=1,
                                       prompt_width=WIDTH)
    def med(fn, n=7):
        fn(); fn()
        ts = []
        for _ in range(n):
            t0 = time.perf_counter(); fn(); ts.append(time.perf_counter() - t0)
        return round(1e3 * statistics.median(ts), 3)
    row = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "att": llama.MATMUL_ATTENTION}
    for n in (1, 65):
        row[f"ar_{n}_ms"] = med(lambda: autoregressive.generate(
            module, params, prompt, max_new_tokens=n, prompt_width=WIDTH))
        sp = lambda: speculative.generate(module, params, prompt, drafter=lookup,
                                          drafter_params=dparams, tree=tree, max_new_tokens=n,
                                          prompt_width=WIDTH)
        row[f"lookup_{n}_steps"] = sp().steps
        row[f"lookup_{n}_ms"] = med(sp)
    row["ar_step_ms"] = (row["ar_65_ms"] - row["ar_1_ms"]) / 64
    row["lookup_step_ms"] = (row["lookup_65_ms"] - row["lookup_1_ms"]) / max(
        1, row["lookup_65_steps"] - row["lookup_1_steps"])
    print("CALLS", json.dumps(row), flush=True)
    if os.environ.get("NO_TRACE"):
        sys.exit(0)
    ev, procs = trace_events(ar1)
    gpu = {p for p, n in procs.items() if "/device:GPU" in n}
    xs = sorted((e for e in ev if e.get("ph") == "X"), key=lambda e: float(e["ts"]))
    k = [e for e in xs if e["pid"] in gpu]
    if not k:
        sys.exit("no device kernels")
    t_first, t_last = float(k[0]["ts"]), max(float(e["ts"]) + float(e.get("dur", 0)) for e in k)
    busy = sum(float(e.get("dur", 0)) for e in k)
    print(f"kernels {len(k)} span_us {t_last - t_first:.0f} sum_dur_us {busy:.0f}")
    prev_end, gaps = t_first, []
    for e in k:
        s = float(e["ts"])
        if s - prev_end > 30:
            gaps.append((round(s - prev_end), e["name"][:80]))
        prev_end = max(prev_end, s + float(e.get("dur", 0)))
    print("gaps > 30 us before kernel:", gaps[:40])
    byname = collections.Counter()
    for e in k:
        byname[re.sub(r"[_.]?\d+$", "", e["name"])[:60]] += float(e.get("dur", 0))
    print("device by kind us:", byname.most_common(15))
    host = collections.Counter(); hostn = collections.Counter()
    for e in xs:
        if e["pid"] not in gpu:
            host[e["name"][:70]] += float(e.get("dur", 0)); hostn[e["name"][:70]] += 1
    print("host events (total us, count):", [(n, round(v), hostn[n]) for n, v in host.most_common(30)])
    first_host = min(float(e["ts"]) for e in xs if e["pid"] not in gpu)
    print("first host event -> first kernel us", t_first - first_host,
          "; last kernel end -> last host event end us",
          max(float(e["ts"]) + float(e.get("dur", 0)) for e in xs if e["pid"] not in gpu) - t_last)
