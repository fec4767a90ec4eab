"""Probe (GPU): which ops the lookup-in-front step's commit-phase kernels run: compiles the lk8_1
case of probe_b8.py (8-node tree, batch 1, random weights of the 0.5B's shape) and writes the
optimized HLO and every fusion touching the commit phase to $OUT (default /tmp):

    PYTHONPATH=.:/tmp/site python3 results/profile_h200_batch8_temperature1/probe_commit.py

commit_move_fusions.txt is the excerpt for one layer's keys: the gather of the accepted path's
entries (loop_select_fusion.47) and their write into place (loop_dynamic_update_slice_fusion.1)."""
import os, re
from probe_b8 import SPEC, compile_case  # this file's folder is on sys.path

text = compile_case(*SPEC["lk8_1"])[0].as_text()
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
