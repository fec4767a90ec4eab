"""Trains a ParallelSpec drafter by group-wise parallel self-distillation.

  python experiments/train_drafter.py \
      --config experiments/configs/parallelspec.py:tiny --workdir /tmp/ps_tiny

Re-running with the same --workdir resumes from its latest checkpoint (data position included).
See experiments/configs/parallelspec.py for the variants and the GPU commands.
"""

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from psjax.training import experiment

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "checkpoints, metrics.jsonl and TensorBoard")
flags.mark_flags_as_required(["config", "workdir"])
_DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "multi-process run (launch/slurm.sbatch, launch/tpu_pod.sh): join the "
    "other processes through JAX's own runtime (jax.distributed.initialize) first")


def main(argv):
    del argv
    if _DISTRIBUTED.value:
        jax.distributed.initialize()
    config = _CONFIG.value
    # Orbax logs every save step at INFO; keep the console for training progress.
    logging.get_absl_handler().addFilter(lambda record: "orbax" not in record.pathname)

    def report(step, m):
        top1 = " ".join(f"{x:.2f}" for x in m["top1"])
        extra = ""
        if "holdout_loss" in m:  # the same metrics on sequences never trained on
            extra += (f" | held out: loss {m['holdout_loss']:.4f} top1/pos ["
                      + " ".join(f"{x:.2f}" for x in m["holdout_top1"])
                      + f"] tau~{m['holdout_tau_estimate']:.2f}")
        if "eval_tau" in m:
            extra += f" eval_tau {m['eval_tau']:.2f}"
        logging.info("step %d loss %.4f top1/pos [%s] tau~%.2f%s %.0f tok/s mfu %.1f%%", step,
                     m["loss"], top1, m["tau_estimate"], extra, m["tokens_per_s"],
                     100 * m["mfu"])

    experiment.train(config, _WORKDIR.value, on_metrics=report)


if __name__ == "__main__":
    app.run(main)
