"""Wall-clock timing that benchmarks share: device-synchronised calls, repeats, the card's name.

JAX is asynchronous: a timed function must return host data (np.asarray of its outputs) or
block on its outputs, so the clock stops only once the device is done. Compilation is excluded
by running a call of the same shapes first.
"""

from __future__ import annotations

import datetime
import statistics
import time
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp


def timed(fn: Callable[..., Any], *args, **kwargs) -> tuple[Any, float]:
    """(fn's result, seconds). `fn` must return only once the device is done (host data)."""
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def time_batches(run_batch: Callable[[Any], Any], groups: Sequence[Any], repeats: int,
                 warmup: Iterable[Any]) -> list[float]:
    """Per-batch median seconds over `repeats` passes; `warmup` lists the batches run (untimed)
    first."""
    for g in warmup:
        run_batch(g)
    times = [[] for _ in groups]
    for _ in range(repeats):
        for i, g in enumerate(groups):
            _, seconds = timed(run_batch, g)  # run_batch returns only once the device is done
            times[i].append(seconds)
    return [statistics.median(t) for t in times]


def measure_bandwidth_tbps() -> float:
    """An elementwise pass (read + write) over a large array, through JAX."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = (256 if on_cpu else 2048) * 2**20 // 4
    x = jnp.ones((n,), jnp.float32)
    f = jax.jit(lambda a: a * 1.0001 + 1.0)
    f(x).block_until_ready()
    times = []
    for _ in range(5):
        _, seconds = timed(lambda: f(x).block_until_ready())
        times.append(seconds)
    return 2 * 4 * n / min(times) / 1e12


def card() -> str:
    """The accelerator's name as JAX reports it (`NVIDIA H100 80GB HBM3`, `cpu`, ...)."""
    return jax.devices()[0].device_kind


def today() -> str:
    """The date a results file records (YYYY-MM-DD)."""
    return datetime.date.today().isoformat()


def run_header() -> dict:
    """What every results file opens with: the card, the date and jax's version."""
    return {"card": card(), "date": today(), "jax": jax.__version__}


def device_names(with_torch: bool = False) -> dict:
    """The JAX device, and (with_torch) torch's device and the library versions."""
    names = {"jax": f"{jax.devices()[0].platform}: {card()}"}
    if with_torch:
        import torch
        import transformers
        names["torch"] = (f"cuda: {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                          else "cpu")
        names["versions"] = (f"jax {jax.__version__}, torch {torch.__version__}, "
                             f"transformers {transformers.__version__}")
    return names
