"""psjax: ParallelSpec speculative decoding in JAX/Flax.

The small public API: `load_target` (a registry name or a local HF directory) and the decoding
entry points. See README.md.
"""

from psjax.decoding.autoregressive import generate as generate_autoregressive
from psjax.decoding.sampling import GREEDY, Sampling
from psjax.models.config import ModelConfig, UnsupportedConfigError
from psjax.models.target import Target, load_target

__all__ = ["GREEDY", "ModelConfig", "Sampling", "Target", "UnsupportedConfigError",
           "generate_autoregressive", "load_target"]
