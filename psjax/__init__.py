"""psjax: ParallelSpec speculative decoding in JAX/Flax.

The small public API: `load_target` (a registry name or a local HF directory), `load_drafter`
(a ParallelSpec drafter directory) and the decoding entry points. See README.md.
"""

from psjax.convert.drafter_hf import load_drafter
from psjax.decoding.autoregressive import generate as generate_autoregressive
from psjax.decoding.sampling import GREEDY, Sampling
from psjax.models.config import ModelConfig, UnsupportedConfigError
from psjax.models.target import Target, load_target

__all__ = ["GREEDY", "ModelConfig", "Sampling", "Target", "UnsupportedConfigError",
           "generate_autoregressive", "load_drafter", "load_target"]
