"""transformers baselines: what a user would run instead of psjax, set up the same way by every
benchmark (experiments/bench_decode.py, experiments/eval_specbench.py).

Variants (`generate_kwargs(variant, ...)`):
  hf_generate         `generate(do_sample=False)`, default dynamic cache, eager.
  hf_static_compiled  `cache_implementation="static"` and `compile_config=CompileConfig(
                      fullgraph=True, mode="reduce-overhead")`: transformers 5 compiles the decode
                      step itself when the cache is static (prefill stays eager); `max_cache_len`
                      fixes the cache size so one compilation serves every prompt.
  hf_static_compiled_forward  the older recipe, `model.forward = torch.compile(model.forward,
                      mode="reduce-overhead", fullgraph=True)`, generate's own compilation off.
  hf_pld              assisted generation by prompt lookup (`prompt_lookup_num_tokens`).
  hf_assisted         assisted generation with a draft model (`assistant_model`), transformers'
                      default schedule; the draft must share the target's tokenizer.
"""

from __future__ import annotations

import gc
import glob
import math
import os
from typing import Sequence

import numpy as np

VARIANTS = ("hf_generate", "hf_static_compiled", "hf_static_compiled_forward", "hf_pld",
            "hf_assisted")


def resolve_model(name: str) -> str:
    """An HF directory for a registry name, an HF directory, or a .gguf file (converted once
    into `<file>.hf/`)."""
    if os.path.isdir(name):
        return name
    from psjax.convert import registry
    if name.endswith(".gguf"):
        out = name + ".hf"
        if not os.path.isdir(out):
            registry.convert_gguf(name, out)
        return out
    return registry.fetch(name)


def count_params(hf_dir: str) -> int:
    """Parameters as stored (tied embeddings once), from the safetensors headers."""
    from safetensors import safe_open
    total = 0
    for path in sorted(glob.glob(os.path.join(hf_dir, "*.safetensors"))):
        with safe_open(path, "np") as f:
            total += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return total


def torch_device() -> str:
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(hf_dir: str, dtype: str):
    import torch
    import transformers
    return transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=getattr(torch, dtype)).to(torch_device()).eval()


def same_tokenizer(dir_a: str, dir_b: str) -> bool:
    """Whether two model directories tokenize identically (same vocabulary and special ids)."""
    import transformers
    a = transformers.AutoTokenizer.from_pretrained(dir_a)
    b = transformers.AutoTokenizer.from_pretrained(dir_b)
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids


def generate_kwargs(variant: str, model, *, max_new_tokens: int, pad_id: int,
                    eos_ids: Sequence[int] | None = None, cache_length: int | None = None,
                    fixed_length: bool = False, prompt_lookup_num_tokens: int = 10,
                    assistant_model=None, temperature: float = 0.0, top_k: int = 0,
                    top_p: float = 1.0) -> dict:
    """`generate` keyword arguments for one variant. `fixed_length`: every row generates exactly
    max_new_tokens (min_new_tokens, no EOS stop). hf_static_compiled_forward compiles
    model.forward in place."""
    import torch
    import transformers
    if variant not in VARIANTS:
        raise ValueError(f"unknown transformers variant {variant!r}; known: {VARIANTS}")
    if temperature > 0:
        kwargs = dict(do_sample=True, temperature=temperature, top_k=top_k or None,
                      top_p=top_p)
    else:
        kwargs = dict(do_sample=False, temperature=None, top_p=None, top_k=None)
    kwargs.update(max_new_tokens=max_new_tokens, pad_token_id=pad_id)
    if fixed_length:
        kwargs["min_new_tokens"] = max_new_tokens
    if eos_ids is not None:
        kwargs["eos_token_id"] = list(eos_ids)
    if variant == "hf_static_compiled":
        config = transformers.CompileConfig(fullgraph=True, mode="reduce-overhead")
        config._compile_all_devices = torch_device() == "cpu"  # else compiled only on GPUs
        kwargs.update(cache_implementation="static", compile_config=config)
    elif variant == "hf_static_compiled_forward":
        model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
        kwargs.update(cache_implementation="static", disable_compile=True)
    elif variant == "hf_pld":
        kwargs["prompt_lookup_num_tokens"] = prompt_lookup_num_tokens
    elif variant == "hf_assisted":
        if assistant_model is None:
            raise ValueError("hf_assisted needs an assistant_model")
        kwargs["assistant_model"] = assistant_model
    if "static" in variant and cache_length and hasattr(transformers.GenerationConfig(),
                                                        "max_cache_len"):
        kwargs["max_cache_len"] = cache_length  # else: sized by the first (longest) call
    return kwargs


def generate(model, prompts: Sequence[Sequence[int]], kwargs: dict, pad_id: int) -> np.ndarray:
    """Left-pads the prompts, generates, and returns the new tokens [B, N] on the host (so the
    device is synchronised when this returns); rows are pad_id-padded after an EOS."""
    import torch
    device = model.device
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
    return out[:, width:].cpu().numpy()  # .cpu() synchronises


def trim_at_eos(tokens: Sequence[int], eos_ids: Sequence[int]) -> list[int]:
    """The tokens up to and including the first EOS."""
    tokens = [int(t) for t in tokens]
    for i, t in enumerate(tokens):
        if t in eos_ids:
            return tokens[:i + 1]
    return tokens


class ForwardCounter:
    """Counts the model's forward calls while active (target forward passes of assisted
    generation: its 'steps'). Not for compiled variants."""

    def __init__(self, model):
        self.model, self.count, self._handle = model, 0, None

    def __enter__(self):
        def hook(*_):
            self.count += 1
        self._handle = self.model.register_forward_pre_hook(hook)
        return self

    def __exit__(self, *exc):
        self._handle.remove()


def compiled_graphs() -> int:
    """torch.compile's graph count so far (the difference across a run: graphs it compiled)."""
    import torch
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def release() -> None:
    """Frees what dropped models left behind (call after `del model`), GPU cache included."""
    import torch
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
