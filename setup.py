"""psjax: ParallelSpec speculative decoding in JAX/Flax."""

from setuptools import find_packages, setup

setup(
    name="psjax",
    version="0.1.0",
    description="ParallelSpec (arXiv 2410.05589): parallel drafting for lossless speculative "
                "decoding, in JAX/Flax",
    packages=find_packages(include=["psjax", "psjax.*"]),
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "orbax-checkpoint>=0.12",
        "transformers>=5.0",
        "tensorflow-datasets>=4.9.10",
        "importlib_resources",  # tensorflow-datasets' ArrayRecord path needs it
        "array_record",
        "absl-py",
        "ml_collections",
        "safetensors>=0.6",
        "gguf==0.19.0",
        "tqdm",
        "tensorboardX",
        "numpy",
        "matplotlib",
    ],
    extras_require={
        # The PyTorch reference: parity tests and the transformers rows of the benchmarks.
        "torch": ["torch>=2.11"],
        "test": ["pytest", "pytest-xdist", "scipy", "torch>=2.11"],
    },
)
