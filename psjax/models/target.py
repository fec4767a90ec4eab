"""The target model as users hold it: module, parameters and tokenizer together."""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from psjax.convert import hf
from psjax.models.config import ModelConfig
from psjax.models.llama import Transformer, fastest_uncached_attention

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass
class Target:
    module: Transformer  # hashable: jitted functions take it as a static argument
    params: Any
    tokenizer: Any = None

    @property
    def config(self) -> ModelConfig:
        return self.module.config

    @property
    def eos_ids(self) -> tuple[int, ...]:
        """End-of-sequence ids: the tokenizer's, plus the chat template's end-of-turn token."""
        if self.tokenizer is None:
            return ()
        ids = {self.tokenizer.eos_token_id}
        for token in ("<|im_end|>", "<|eot_id|>", "<|endoftext|>"):
            token_id = self.tokenizer.convert_tokens_to_ids(token)
            if isinstance(token_id, int) and token_id != self.tokenizer.unk_token_id:
                ids.add(token_id)
        return tuple(sorted(i for i in ids if i is not None))

    def chat_prompt(self, user_turns: list[str], assistant_turns: list[str] = (),
                    add_generation_prompt: bool = True) -> list[int]:
        """Token ids of a conversation through the model's chat template, ready for a reply
        (or, with add_generation_prompt=False, ending with the last assistant turn)."""
        messages = []
        for i, turn in enumerate(user_turns):
            messages.append({"role": "user", "content": turn})
            if i < len(assistant_turns):
                messages.append({"role": "assistant", "content": assistant_turns[i]})
        ids = self.tokenizer.apply_chat_template(messages, tokenize=True,
                                                 add_generation_prompt=add_generation_prompt)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def random_target(config: ModelConfig, seed: int = 0, dtype: str = "float32",
                  scale: float = 1.0, fused: bool = False) -> Target:
    """A target of the given shapes with random weights (tiny test configs, and real shapes for
    timing models too large to bring along). `scale` multiplies the init: larger makes peakier
    next-token distributions, which a drafter can learn. `fused`, attention: as in
    load_target."""
    module = _module(config, dtype, fused)
    dummy = jnp.zeros((1, 4), jnp.int32)
    params = jax.jit(lambda rng: jax.tree.map(
        lambda x: x * scale if x.ndim > 1 else x,
        nn.meta.unbox(module.init(rng, dummy, dummy)["params"])))(jax.random.PRNGKey(seed))
    return Target(module, params, None)


def load_target(name_or_path: str, dtype: str = "float32", tokenizer: bool = True,
                fused: bool = True) -> Target:
    """A registry name (`smollm2-135m-instruct`, ...) or a local HF directory. `fused`: q/k/v
    and gate/up each run as one matmul (same parameters), 13% off a decode step of
    Qwen2.5-0.5B on an H100 (results/limits_h100/). Prompt passes attend as
    `llama.fastest_uncached_attention` says for the dtype (cuDNN's flash attention on a GPU in
    bfloat16); `target.module.clone(uncached_attention=...)` picks another."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.isdir(name_or_path):
        path = name_or_path
    else:
        from psjax.convert import registry  # imported lazily: it pulls in pip and gguf
        path = registry.fetch(name_or_path)
    config, params = hf.load_hf_dir(path, DTYPES[dtype])
    params = jax.device_put(params)
    tok = None
    if tokenizer:
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(path)
        if len(tok) > config.vocab_size:
            raise ValueError(f"tokenizer of {path} has {len(tok)} tokens but the model's "
                             f"vocab_size is {config.vocab_size}")
    return Target(_module(config, dtype, fused), params, tok)


def _module(config: ModelConfig, dtype: str, fused: bool) -> Transformer:
    return Transformer(config, dtype=DTYPES[dtype], param_dtype=DTYPES[dtype], fused=fused,
                       uncached_attention=fastest_uncached_attention(DTYPES[dtype]))
