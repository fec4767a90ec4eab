"""Orbax behind one small module: the trainer saves and restores through this and nothing else.

A checkpoint holds the train state (drafter params, optimizer state, step) and a JSON item with
the data position and what is needed to rebuild the drafter (its config and the target's name).
Restore order: the run's own latest checkpoint, then `init_from` (params only), then scratch.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, workdir: str, keep: int = 3, every_steps: int = 1000,
                 async_save: bool = True):
        self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                max_to_keep=keep, save_interval_steps=every_steps,
                enable_async_checkpointing=async_save),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, force: bool = False) -> bool:
        return self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

    def restore(self, abstract_state: Any, step: int | None = None) -> tuple[Any, dict]:
        """Restores onto the shardings of `abstract_state` (ShapeDtypeStructs with shardings)."""
        step = self.manager.latest_step() if step is None else step
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, dict, str]:
    """The drafter params of a training workdir, with the drafter config dict and target name
    recorded at save time (for export). Host numpy arrays, no shardings needed."""
    ckpt = Checkpointer(workdir, async_save=False)
    step = ckpt.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt.directory}: train first "
                                "(experiments/train_drafter.py --workdir ...)")
    restored = ckpt.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(), meta=ocp.args.JsonRestore()))
    ckpt.close()
    params = jax.tree.map(jax.device_get, restored["state"]["params"])
    meta = restored["meta"]
    return params, meta["drafter"], meta["target_name"]
