"""Hugging Face directories <-> psjax parameter pytrees: one mapping table serves both ways.

An HF directory is `config.json` plus `*.safetensors` (one file, or shards with an index). psjax
keeps HF's names and layout, so every entry is a rename plus, for linear layers, a transpose
(HF stores `[out, in]`, Flax's Dense kernels are `[in, out]`).
"""

from __future__ import annotations

import glob
import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.flax
import safetensors.numpy

from psjax.models.config import ModelConfig

_LINEARS = {
    "self_attn.q_proj": "self_attn/q_proj", "self_attn.k_proj": "self_attn/k_proj",
    "self_attn.v_proj": "self_attn/v_proj", "self_attn.o_proj": "self_attn/o_proj",
    "mlp.gate_proj": "mlp/gate_proj", "mlp.up_proj": "mlp/up_proj",
    "mlp.down_proj": "mlp/down_proj",
}
_NORMS = {"input_layernorm": "input_layernorm", "post_attention_layernorm":
          "post_attention_layernorm"}
# Buffers some checkpoints carry that psjax recomputes.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class MissingTensorError(KeyError):
    def __str__(self):
        return str(self.args[0])


def layer_mapping(config: ModelConfig, hf_prefix: str,
                  our_path: tuple[str, ...]) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Yields (HF name, psjax path, transpose) for the tensors of one decoder layer: HF names
    under `hf_prefix` (e.g. "model.layers.3"), psjax paths under `our_path` (e.g. ("layers_3",))."""
    for hf, ours in _LINEARS.items():
        path = (*our_path, *ours.split("/"))
        yield f"{hf_prefix}.{hf}.weight", (*path, "kernel"), True
        if config.attention_bias and hf in ("self_attn.q_proj", "self_attn.k_proj",
                                            "self_attn.v_proj"):
            yield f"{hf_prefix}.{hf}.bias", (*path, "bias"), False
    for hf, ours in _NORMS.items():
        yield f"{hf_prefix}.{hf}.weight", (*our_path, ours, "scale"), False


def mapping(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Yields (HF name, psjax path, transpose) for every tensor of `config`'s model."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
    for i in range(config.num_hidden_layers):
        yield from layer_mapping(config, f"model.layers.{i}", (f"layers_{i}",))
    yield "model.norm.weight", ("norm", "scale"), False
    if not config.tie_word_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), True


def params_from_state_dict(state: Mapping[str, np.ndarray], config: ModelConfig,
                           dtype=jnp.float32, source: str = "the checkpoint") -> dict:
    """HF-named arrays -> the nested parameter dict of psjax.models.Transformer."""
    params, expected = params_from_table(
        state, mapping(config), dtype, source,
        f"a {config.architecture} with {config.num_hidden_layers} layers")
    unexpected = [k for k in state if k not in expected and not k.endswith(_IGNORED_SUFFIXES)
                  and not (config.tie_word_embeddings and k == "lm_head.weight")]
    if unexpected:
        raise ValueError(f"{source} has tensors psjax does not know: {sorted(unexpected)[:8]}")
    return params


def params_from_table(state: Mapping[str, np.ndarray], table, dtype, source: str,
                      needed_by: str) -> tuple[dict, set[str]]:
    """HF-named arrays -> a nested parameter dict along a (HF name, path, transpose) table; also
    returns the names it used. The twin of `state_dict_from_table`."""
    params: dict[str, Any] = {}
    used = set()
    for name, path, transpose in table:
        used.add(name)
        if name not in state:
            raise MissingTensorError(
                f"tensor {name!r} is missing from {source}; {needed_by} needs it")
        array = np.asarray(state[name])
        array = array.T if transpose else array
        node = params
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(array, dtype=dtype)
    return params, used


def state_dict_from_params(params: Mapping, config: ModelConfig, dtype=np.float32) -> dict:
    return state_dict_from_table(params, mapping(config), dtype)


def state_dict_from_table(params: Mapping, table, dtype=np.float32) -> dict:
    """Parameter pytree -> HF-named numpy arrays along a (HF name, path, transpose) table."""
    out = {}
    for name, path, transpose in table:
        node = params
        for key in path:
            node = node[key]
        array = np.asarray(jax.device_get(node).astype(jnp.float32)).astype(dtype)
        out[name] = np.ascontiguousarray(array.T if transpose else array)
    return out


def read_safetensors(path: str) -> dict[str, np.ndarray]:
    """All tensors of an HF directory (sharded or not) as numpy arrays (bfloat16 upcast)."""
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(
            f"no *.safetensors file in {path}; psjax reads HF directories in safetensors format "
            "(convert .bin checkpoints with transformers' save_pretrained(safe_serialization=True))")
    state = {}
    for file in files:
        # The flax loader understands bfloat16, which numpy alone does not.
        state.update({k: np.asarray(v) for k, v in safetensors.flax.load_file(file).items()})
    return state


def load_hf_dir(path: str, dtype=jnp.float32) -> tuple[ModelConfig, dict]:
    """Reads config.json and the safetensors weights of a local HF directory."""
    config = ModelConfig.from_hf_dir(path)
    return config, params_from_state_dict(read_safetensors(path), config, dtype, source=path)


def save_state_dict(path: str, state: Mapping[str, np.ndarray], hf_config: Mapping,
                    max_shard_bytes: int = 2 << 30) -> None:
    """Writes config.json and safetensors shards (HF's `model-0000N-of-0000M` layout when more
    than one shard is needed)."""
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(hf_config), f, indent=2)
    shards, current, size = [], {}, 0
    for name, array in state.items():
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    if len(shards) == 1:
        safetensors.numpy.save_file(shards[0], os.path.join(path, "model.safetensors"),
                                    metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        safetensors.numpy.save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
    total = sum(a.nbytes for a in state.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def save_hf_dir(path: str, config: ModelConfig, params: Mapping, dtype=np.float32,
                max_shard_bytes: int = 2 << 30, extra_config: Mapping | None = None) -> None:
    """Exports a target model so that transformers' AutoModelForCausalLM loads it."""
    hf_config = {**config.to_hf_dict(), "torch_dtype": np.dtype(dtype).name,
                 **(extra_config or {})}
    save_state_dict(path, state_dict_from_params(params, config, dtype), hf_config,
                    max_shard_bytes)
