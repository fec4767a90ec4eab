"""Writes (and with --execute, runs in place) notebooks/quickstart.ipynb and train_drafter.ipynb.

  cd /work/main && PYTHONPATH=. .venv/bin/python notebooks/build_notebooks.py --execute
"""

import os
import sys

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''\
# Colab: clones the repo, %cd's into the clone and pip-installs it (editable). The clone is
# needed, not just `pip install git+...`: the committed drafter lives in assets/.
# Locally (Jupyter started anywhere inside a checkout): just moves to the repo root.
import os, subprocess, sys
REPO_URL = "https://github.com/YOUR_ORG/psjax.git"  # placeholder: your fork / mirror of psjax
if "google.colab" in sys.modules:
    if not os.path.isdir("/content/psjax"):
        subprocess.run(["git", "clone", "-q", REPO_URL, "/content/psjax"], check=True)
    os.chdir("/content/psjax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."], check=True)
else:
    while not os.path.isdir("psjax") and os.getcwd() != "/":
        os.chdir("..")
sys.path.insert(0, os.getcwd())
print(os.getcwd())'''

quickstart = new_notebook(cells=[
    new_markdown_cell(
        "# psjax quickstart: lossless speculative decoding with a ParallelSpec drafter\n\n"
        "Loads SmolLM2-135M-Instruct and the committed ParallelSpec drafter, decodes one chat "
        "prompt greedily with plain autoregressive decoding and with speculative decoding, "
        "and checks the two outputs are identical. Runs on CPU (float32) in a couple of "
        "minutes; on a GPU/TPU runtime it is much faster."),
    new_code_cell(SETUP),
    new_code_cell('''\
import jax
import psjax
from psjax.decoding import speculative
print(jax.__version__, jax.devices())

target = psjax.load_target("smollm2-135m-instruct", dtype="float32")  # fetched + converted once
drafter, drafter_params = psjax.load_drafter(
    "assets/drafters/smollm2-135m-instruct-parallelspec", target)
print(f"target {target.config.num_params() / 1e6:.0f}M params, "
      f"drafter k={drafter.config.num_masks}")'''),
    new_code_cell('''\
prompt = target.chat_prompt(["Write a short Python function that checks whether a number is prime."])
MAX_NEW = 32
ar = psjax.generate_autoregressive(target.module, target.params, [prompt],
                                   max_new_tokens=MAX_NEW, eos_ids=target.eos_ids)
spec = speculative.generate(target.module, target.params, [prompt], drafter=drafter,
                            drafter_params=drafter_params, tree=drafter.config.num_masks,
                            max_new_tokens=MAX_NEW, eos_ids=target.eos_ids)
ar_ids, spec_ids = ar.sequences()[0], spec.sequences()[0]
assert ar_ids == spec_ids, "speculative greedy output differs from autoregressive"
print("identical outputs:", ar_ids == spec_ids)
print(f"target forward passes: autoregressive {ar.steps}, speculative {spec.steps}")
print(f"tau (tokens per target pass): {spec.tau:.2f}")
print("---")
print(target.tokenizer.decode(spec_ids, skip_special_tokens=True))'''),
])

train = new_notebook(cells=[
    new_markdown_cell(
        "# Training a ParallelSpec drafter (tiny config)\n\n"
        "The `tiny` variant of `experiments/configs/parallelspec.py`: a tiny random target, "
        "distilled on its own answers to random prompts; CPU-sized. The real runs use "
        "`experiments/train_drafter.py` (see `launch/`)."),
    new_code_cell(SETUP),
    new_code_cell('''\
import importlib.util, tempfile
import matplotlib.pyplot as plt
from psjax.training import experiment

spec = importlib.util.spec_from_file_location("ps_configs", "experiments/configs/parallelspec.py")
configs = importlib.util.module_from_spec(spec)
spec.loader.exec_module(configs)
config = configs.get_config("tiny")
config.log_every = 1          # a loss point every step, for the plot
config.total_steps = 40
config.eval_every = 40        # tau + lossless check once, at the end
workdir = tempfile.mkdtemp(prefix="ps_tiny_")  # a fresh dir: the same dir would resume
print(config.total_steps, "steps ->", workdir)'''),
    new_code_cell('''\
trainer, history = experiment.train(config, workdir)
last = history[-1]
print(f"final loss {last['loss']:.3f}, eval tau {last.get('eval_tau', float('nan')):.2f}, "
      f"eval divergences {last.get('eval_divergences')}")'''),
    new_code_cell('''\
steps = [m["step"] for m in history]
plt.figure(figsize=(5, 3))
plt.plot(steps, [m["loss"] for m in history])
plt.xlabel("step"); plt.ylabel("loss"); plt.title("ParallelSpec drafter, tiny config")
plt.tight_layout(); plt.show()'''),
])

for nb in (quickstart, train):
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nb.metadata["accelerator"] = "GPU"

for name, nb in (("quickstart.ipynb", quickstart), ("train_drafter.ipynb", train)):
    path = os.path.join(HERE, name)
    if "--execute" in sys.argv:
        from nbclient import NotebookClient
        NotebookClient(nb, timeout=1200, kernel_name="python3",
                       resources={"metadata": {"path": HERE}}).execute()
    nbformat.validate(nb)
    nbformat.write(nb, path)
    print("wrote", path, os.path.getsize(path), "bytes")
