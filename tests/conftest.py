"""Test set-up: 8 fake CPU devices (for the sharding tests) and shared model fixtures."""

import os

# Must precede the first jax import of the session.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import json  # noqa: E402
import pathlib  # noqa: E402

import pytest  # noqa: E402

SPEC_BENCH = pathlib.Path(__file__).resolve().parents[2] / "shared/data/spec_bench/question.jsonl"


@pytest.fixture(scope="session")
def spec_bench_questions():
    if not SPEC_BENCH.exists():
        pytest.fail(f"{SPEC_BENCH} is missing: the tests expect ../shared beside the checkout")
    with open(SPEC_BENCH) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct as an HF directory (fetched once, then cached)."""
    from psjax.convert import registry
    return registry.fetch("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    import psjax
    return psjax.load_target(smollm2_dir, dtype="float32")
