"""Drafter training throughput at a real target's shapes: steps/s, tokens/s and MFU of the full
train step (target forward, drafter forward and backward, optimizer), and where its time goes.

Random weights and random tokens give the true cost of a step (the work does not depend on the
values), so nothing has to be brought to the machine. Every variant runs in one process, one
after another, timed the same way (median of `--repeats` timings of `--steps` steps each, after a
compiling warm-up); `--profile` adds, per variant, the device time per step split by the phase
the trainer's named scopes mark (`trainer.PHASES`; `backward/` for the gradient's ops) and the
top kernels.

  python experiments/bench_train.py --shape qwen2.5-0.5b --num_masks 1,3,7 --dense_weight 0,1 \
      --profile --out /tmp/bench_train.json

CPU smoke test: `--shape smollm2-135m --batch_size 2 --max_length 64 --steps 2 --repeats 1`.
"""

from __future__ import annotations

import functools
import itertools
import json
import re
import statistics
import tempfile

from absl import app, flags
import jax
import numpy as np

from psjax import sharding
from psjax.bench import limits
from psjax.bench.timing import run_header, timed
from psjax.drafters import parallelspec
from psjax.models.target import random_target
from psjax.training import trainer as trainer_lib

FLAGS = flags.FLAGS
flags.DEFINE_string("shape", "qwen2.5-0.5b", f"target shapes, one of {sorted(limits.SHAPES)}")
flags.DEFINE_integer("batch_size", 16, "sequences per step")
flags.DEFINE_integer("max_length", 512, "tokens per sequence")
flags.DEFINE_integer("prompt_length", 128, "prompt tokens per sequence (no anchors before)")
flags.DEFINE_list("num_masks", ["3"], "k values to run")
flags.DEFINE_list("dense_weight", ["0"], "loss.dense_weight values to run")
flags.DEFINE_list("attention", ["auto"], "TrainConfig.attention values to run "
                  "(auto, einsum, xla, cudnn)")
flags.DEFINE_integer("num_anchors", 64, "groups per sequence")
flags.DEFINE_string("input_mode", "feature", "drafter input mode")
flags.DEFINE_list("feature_layers", [], "target layers the drafter reads (feature mode; "
                  "empty: the last hidden state)")
flags.DEFINE_integer("steps", 10, "steps per timing")
flags.DEFINE_integer("repeats", 3, "timings per variant (median)")
flags.DEFINE_float("peak_tflops", 989.0, "bf16 dense peak of the card, for MFU")
flags.DEFINE_bool("profile", False, "device time per step by phase and kernel (GPU trace)")
flags.DEFINE_string("out", "", "JSON file for the results")


def random_batch(config, batch: int, length: int, prompt_length: int) -> dict:
    rng = np.random.default_rng(0)
    return {"tokens": rng.integers(0, config.vocab_size, (batch, length)).astype(np.int32),
            "lengths": np.full((batch,), length, np.int32),
            "prompt_lengths": np.full((batch,), prompt_length, np.int32)}


def run_variant(target, k: int, dense: float, attention: str, workdir: str) -> dict:
    loss = trainer_lib.LossConfig(num_anchors=FLAGS.num_anchors, dense_weight=dense,
                                  hard_weight=0.1)
    config = trainer_lib.TrainConfig(workdir=workdir, batch_size=FLAGS.batch_size,
                                     max_length=FLAGS.max_length, total_steps=10 ** 6, loss=loss,
                                     peak_tflops=FLAGS.peak_tflops,
                                     attention=attention)
    drafter_config = parallelspec.ParallelSpecConfig(
        target.config, num_masks=k, input_mode=FLAGS.input_mode,
        feature_layers=tuple(int(n) for n in FLAGS.feature_layers))
    trainer = trainer_lib.Trainer(config, target, drafter_config, FLAGS.shape)
    batch = jax.device_put(random_batch(target.config, FLAGS.batch_size, FLAGS.max_length,
                                        FLAGS.prompt_length), trainer.batch_sharding)
    rng = jax.random.PRNGKey(0)

    def steps(n: int):
        with sharding.activate(trainer.mesh, config.rules):
            for _ in range(n):
                trainer.state, metrics = trainer._step(trainer.state, trainer.target_params,
                                                       batch, rng)
        return float(metrics["loss"])  # host data: the device is done

    steps(2)  # compile, warm up
    seconds = statistics.median(timed(steps, FLAGS.steps)[1] / FLAGS.steps
                                for _ in range(FLAGS.repeats))
    flops = trainer_lib.step_flops(target.config, drafter_config, FLAGS.batch_size,
                                   FLAGS.max_length, FLAGS.num_anchors, bool(dense))
    row = {"num_masks": k, "dense_weight": dense, "attention": attention,
           "step_ms": 1e3 * seconds, "steps_per_s": 1 / seconds,
           "tokens_per_s": FLAGS.batch_size * FLAGS.max_length / seconds,
           "model_tflops_per_step": flops / 1e12,
           "mfu": flops / seconds / (FLAGS.peak_tflops * 1e12)}
    if FLAGS.profile:
        with sharding.activate(trainer.mesh, config.rules):
            hlo = trainer._step.lower(trainer.state, trainer.target_params, batch,
                                      rng).compile().as_text()
        row["profile"] = limits.device_trace(lambda: steps(FLAGS.steps), FLAGS.steps,
                                             hlo_text=lambda: hlo, phase_of=functools.partial(
                                                 limits.scope_phases, scopes=trainer_lib.PHASES))
        # What the top kernels compute: the tail of their op_name (library GEMMs have none).
        ops = {re.sub(r"\.(\d+)$", r"_\1", name): op for name, op in limits.hlo_ops(hlo).items()}
        row["profile"]["top_named_kernels_op"] = {
            name: ops.get(name, "")[-90:]
            for name in row["profile"].get("top_named_kernels_ms_per_step", {})}
    print(json.dumps({k: v for k, v in row.items() if k != "profile"}), flush=True)
    return row


def main(argv):
    del argv
    target = random_target(limits.shape_config(FLAGS.shape), dtype="bfloat16", fused=True)
    rows = []
    for k, dense, attention in itertools.product(FLAGS.num_masks, FLAGS.dense_weight,
                                                 FLAGS.attention):
        with tempfile.TemporaryDirectory() as workdir:
            rows.append(run_variant(target, int(k), float(dense), attention, workdir))
    result = {**run_header(), "shape": FLAGS.shape, "batch_size": FLAGS.batch_size,
              "max_length": FLAGS.max_length, "num_anchors": FLAGS.num_anchors,
              "input_mode": FLAGS.input_mode,
              "feature_layers": [int(n) for n in FLAGS.feature_layers], "rows": rows}
    print("| k | dense | attention | step ms | steps/s | tokens/s | MFU |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['num_masks']} | {r['dense_weight']:g} | {r['attention']} | "
              f"{r['step_ms']:.1f} | {r['steps_per_s']:.1f} | {r['tokens_per_s']:,.0f} | "
              f"{100 * r['mfu']:.1f}% |")
        if "profile" in r:
            print(json.dumps(r["profile"], indent=1))
    if FLAGS.out:
        with open(FLAGS.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    app.run(main)
