"""The device mesh and the logical-axis rules that place parameters and activations on it.

Models name their axes logically (`embed`, `heads`, `mlp`, `vocab`, `batch`, ...); experiment
configs map those names to mesh axes (`data`, `fsdp`, `tensor`). The same code then runs on one
CPU, one GPU, 8 fake CPU devices in the tests, or a TPU pod through JAX's multi-host runtime.
"""

from __future__ import annotations

import contextlib
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = Sequence[tuple[str, Any]]

DEFAULT_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("masks", None),  # the drafter's k mask embeddings
    ("fused", None),  # the drafter's [embedding; feature] input
)


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tensor) mesh over all devices; one axis may be -1 (take the rest)."""
    devices = list(devices if devices is not None else jax.devices())
    shape = [data, fsdp, tensor]
    if shape.count(-1) > 1:
        raise ValueError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, shape))}")
    known = int(np.prod([s for s in shape if s != -1]))
    if -1 in shape:
        if len(devices) % known:
            raise ValueError(f"{len(devices)} devices do not divide into mesh {shape}")
        shape[shape.index(-1)] = len(devices) // known
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh {dict(zip(MESH_AXES, shape))} needs {int(np.prod(shape))} "
                         f"devices, {len(devices)} are present")
    return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 3,
                         devices=devices)


def logical_axes(init_fn: Callable[[], Any]) -> Any:
    """The logical PartitionSpec of every parameter, from an init function, without allocating."""
    return nn.get_partition_spec(jax.eval_shape(init_fn))


def to_mesh_spec(logical: PartitionSpec, shape: Sequence[int], mesh: Mesh,
                 rules: Rules) -> PartitionSpec:
    """Maps one logical spec to mesh axes. An axis name without a rule is an error; a dimension
    its mesh axes do not divide stays replicated (logged)."""
    table = dict(rules)
    out = []
    for name, dim in zip(tuple(logical) + (None,) * (len(shape) - len(logical)), shape):
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise KeyError(f"logical axis {name!r} has no sharding rule; add it to the rules "
                           f"(known: {sorted(table)})")
        axes = table[name]
        size = int(np.prod([mesh.shape[a] for a in (axes if isinstance(axes, tuple) else
                                                    (axes,)) if a is not None])) if axes else 1
        if axes and dim % size:
            logging.info("axis %s of size %d not divisible by %s=%d: replicated", name, dim,
                         axes, size)
            axes = None
        out.append(axes)
    return PartitionSpec(*out)


def shardings(logical_tree: Any, abstract_tree: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """NamedShardings for a pytree, given its logical specs and its shapes."""
    return jax.tree.map(
        lambda spec, x: NamedSharding(mesh, to_mesh_spec(spec, x.shape, mesh, rules)),
        logical_tree, abstract_tree,
        is_leaf=lambda x: isinstance(x, PartitionSpec))


def data_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Batch-major arrays: the batch over (data, fsdp), the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(("data", "fsdp"), *([None] * (ndim - 1))))


@contextlib.contextmanager
def activate(mesh: Mesh, rules: Rules = DEFAULT_RULES):
    """Within this context, the models' logical activation constraints bind to `mesh`."""
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        yield
