"""Exports a trained ParallelSpec drafter (a training workdir's Orbax checkpoint) as an HF-style
directory that `psjax.load_drafter` reads.

From the repository root:

    PYTHONPATH=. python3 experiments/export_hf.py --workdir /tmp/runs/ps_smollm2 \
        --out /tmp/out/drafter_smollm2 --dtype bfloat16 --max_shard_mb 15

The directory holds `config.json` (`model_type: "parallelspec"`, k, mask token ids, input mode,
target name and config) and safetensors weights, in `model-0000N-of-0000M.safetensors` shards of
at most --max_shard_mb MiB (the GPU machine returns files of at most 16 MiB, hence the default 15)
plus `model.safetensors.index.json` when one file would be larger. Then:

    drafter, params = psjax.load_drafter("/tmp/out/drafter_smollm2", target=target)
"""

from __future__ import annotations

from absl import app, flags, logging
import jax
import numpy as np

from psjax.convert import drafter_hf

_WORKDIR = flags.DEFINE_string("workdir", None, "training workdir (holds checkpoints/)",
                               required=True)
_OUT = flags.DEFINE_string("out", None, "output directory", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: the latest)")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"],
                           "dtype of the exported tensors")
_MAX_SHARD_MB = flags.DEFINE_float("max_shard_mb", 15.0, "largest safetensors shard, in MiB")


def main(argv):
    del argv
    from psjax.training import checkpoint
    # The single call into the trainer: -> (params, drafter config dict, target name); the dict
    # is drafter_hf.config_to_dict's format ({num_masks, input_mode, feature_layers,
    # target_config}).
    params, config_dict, target_name = checkpoint.restore_params(_WORKDIR.value, _STEP.value)
    config = drafter_hf.config_from_dict(config_dict)
    dtype = {"float32": np.float32, "bfloat16": jax.numpy.bfloat16}[_DTYPE.value]
    drafter_hf.save_drafter(_OUT.value, config, params, target_name, dtype=dtype,
                            max_shard_bytes=int(_MAX_SHARD_MB.value * 2**20))
    num = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    logging.info("exported the ParallelSpec drafter (k=%d, %s mode, %.2fM params, %s) for %s "
                 "to %s", config.num_masks, config.input_mode, num / 1e6, _DTYPE.value,
                 target_name, _OUT.value)


if __name__ == "__main__":
    app.run(main)
