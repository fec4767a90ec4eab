"""Probe (GPU): which ops the lookup-in-front step's commit-phase kernels run: compiles the lk8_1
case of probe_b8.py (8-node tree, batch 1, random weights of the 0.5B's shape) and writes the
optimized HLO and every fusion touching the commit phase to $OUT (default /tmp):

    PYTHONPATH=.:/tmp/site python3 results/profile_h200_batch8_temperature1/probe_commit.py

commit_move_fusions.txt is the excerpt for one layer's keys: the gather of the accepted path's
entries (loop_select_fusion.47) and their write into place (loop_dynamic_update_slice_fusion.1)."""
import os, re
import jax, jax.numpy as jnp, numpy as np
from psjax.bench import limits
from psjax.decoding import common, speculative
from psjax.decoding.sampling import GREEDY
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec
from psjax.drafters.with_lookup import WithPromptLookup
from psjax.models.target import random_target
target = random_target(limits.shape_config("qwen2.5-0.5b"), dtype="bfloat16", fused=True)
module, params = target.module, target.params
drafter = parallelspec.build(parallelspec.ParallelSpecConfig(
    module.config, num_masks=3, feature_layers=(2, 12, 24)), module, dtype=jnp.bfloat16)
dparams = parallelspec.init_params(drafter, jax.random.PRNGKey(1))
lookup = WithPromptLookup(drafter)
t = Tree.parse("results/tree_design_lookup_qwen05b_cpu/tree_lookup_decoded.json:8")
rng = np.random.default_rng(0)
base = rng.integers(0, 150000, 60).tolist()
tokens, lengths = common.pad_prompts([(base * 6)[:200]], 0, 512)
NEW = 257
kw = dict(tree=t, max_new_tokens=NEW, sampling=GREEDY, eos_ids=(), cache_dtype=jnp.dtype(jnp.bfloat16),
          cache_length=common.default_cache_length(512, NEW, max(t.num_nodes + 1, lookup.cache_lookahead(t.max_depth))))
text = speculative._generate.lower(module, params, lookup, dparams, jnp.asarray(tokens), jnp.asarray(lengths),
                                   jax.random.PRNGKey(0), **kw).compile().as_text()
open(os.environ.get("OUT", "/tmp") + "/lk8_1_hlo.txt", "w").write(text)
out = open(os.environ.get("OUT", "/tmp") + "/commit_fusions.txt", "w")
for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = (.*?) fusion\(.*?calls=%([\w.\-]+).*$", text, re.M):
    name, shape, comp = m.groups()
    b = re.search(r"^%" + re.escape(comp) + r" .*?^}", text, re.M | re.S)
    body = b.group(0) if b else ""
    if "commit" not in m.group(0) + body and name != "loop_select_fusion.47":
        continue
    print("=====", name, shape[:150], flush=True)
    out.write(f"===== {name} {shape}\n{m.group(0)[:2000]}\n{body[:6000]}\n")
