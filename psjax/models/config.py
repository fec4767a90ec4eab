"""The target model's configuration, read from a Hugging Face `config.json`.

psjax handles the Llama family (Llama 1-3, Qwen2, Mistral without sliding window). Import refuses
any attribute it does not understand instead of guessing: a model that silently computes something
else than its HF twin would poison every number downstream.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "mistral": "MistralForCausalLM",
}

# Attributes that do not change what the forward pass computes.
_INERT_KEYS = frozenset({
    "architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "bos_token_id",
    "eos_token_id", "pad_token_id", "use_cache", "initializer_range", "max_window_layers",
    "attention_dropout", "_name_or_path", "return_dict", "output_hidden_states",
    "output_attentions", "torchscript", "id2label", "label2id", "problem_type", "tokenizer_class",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "tie_encoder_decoder", "cross_attention_hidden_size", "task_specific_params", "prefix",
    "sep_token_id", "decoder_start_token_id", "finetuning_task", "pruned_heads", "bad_words_ids",
    "begin_suppress_tokens",
})


class UnsupportedConfigError(ValueError):
    """The HF config asks for something psjax's target model does not compute."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shapes and numerics of a Llama-family decoder (names follow HF's config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    max_position_embeddings: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    # Llama-3 scaling: (factor, low_freq_factor, high_freq_factor, original_max_position_embeddings).
    rope_llama3_scaling: tuple[float, float, float, int] | None = None
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    model_type: str = "llama"

    @property
    def num_groups(self) -> int:
        return self.num_attention_heads // self.num_key_value_heads

    @property
    def architecture(self) -> str:
        return SUPPORTED_MODEL_TYPES[self.model_type]

    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        attn = d * q + 2 * d * kv + q * d + (q + 2 * kv if self.attention_bias else 0)
        layer = attn + 3 * d * f + 2 * d
        return v * d * (1 if self.tie_word_embeddings else 2) + self.num_hidden_layers * layer + d

    # --- HF config.json ---------------------------------------------------------------------------

    @classmethod
    def from_hf_dict(cls, hf: Mapping[str, Any]) -> "ModelConfig":
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"unknown architecture model_type={model_type!r} (architectures="
                f"{hf.get('architectures')}); psjax supports {sorted(SUPPORTED_MODEL_TYPES)}")
        hf = dict(hf)
        consumed = set(_INERT_KEYS)

        def take(key, default=dataclasses.MISSING):
            consumed.add(key)
            if key in hf and hf[key] is not None:
                return hf[key]
            if default is dataclasses.MISSING:
                raise UnsupportedConfigError(f"config.json lacks the required attribute {key!r}")
            return default

        def require(key, allowed, default):
            value = take(key, default)
            if value not in allowed:
                raise UnsupportedConfigError(
                    f"config.json has {key}={value!r}; psjax only computes {key} in {allowed}")

        require("hidden_act", ("silu",), "silu")
        require("mlp_bias", (False,), False)
        require("pretraining_tp", (1,), 1)
        require("use_sliding_window", (False,), False)
        require("sliding_window", (None,), None)
        require("attention_dropout", (0, 0.0), 0.0)
        layer_types = set(take("layer_types", ()))
        if layer_types - {"full_attention"}:
            raise UnsupportedConfigError(
                f"layer_types {sorted(layer_types)}: psjax computes full attention only")

        heads = take("num_attention_heads")
        hidden = take("hidden_size")
        rope_theta, llama3 = _rope(hf, take)
        attention_bias = take("attention_bias", model_type == "qwen2")
        if model_type == "qwen2" and not attention_bias:
            raise UnsupportedConfigError("qwen2 configs always have Q/K/V biases")
        config = cls(
            vocab_size=take("vocab_size"),
            hidden_size=hidden,
            intermediate_size=take("intermediate_size"),
            num_hidden_layers=take("num_hidden_layers"),
            num_attention_heads=heads,
            num_key_value_heads=take("num_key_value_heads", heads),
            head_dim=take("head_dim", hidden // heads),
            max_position_embeddings=take("max_position_embeddings"),
            rms_norm_eps=take("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_llama3_scaling=llama3,
            attention_bias=bool(attention_bias),
            tie_word_embeddings=bool(take("tie_word_embeddings", False)),
            model_type=model_type,
        )
        unknown = sorted(set(hf) - consumed)
        if unknown:
            raise UnsupportedConfigError(
                f"config.json has attributes psjax does not handle: {unknown}. Refusing to guess "
                "what they change; extend psjax.models.config if they are harmless.")
        if heads % config.num_key_value_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads={heads} is not a multiple of "
                f"num_key_value_heads={config.num_key_value_heads}")
        return config

    @classmethod
    def from_hf_dir(cls, path: str | os.PathLike) -> "ModelConfig":
        config_path = os.path.join(path, "config.json")
        if not os.path.exists(config_path):
            raise FileNotFoundError(
                f"{config_path} does not exist: a model directory needs the HF config.json")
        with open(config_path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        hf = {
            "architectures": [self.architecture],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": self.tie_word_embeddings,
            "rope_theta": self.rope_theta,
        }
        if self.model_type != "qwen2":
            hf["attention_bias"] = self.attention_bias
        if self.rope_llama3_scaling is not None:
            factor, low, high, original = self.rope_llama3_scaling
            hf["rope_scaling"] = {
                "rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": original}
        return hf


def _rope(hf: Mapping[str, Any], take) -> tuple[float, tuple | None]:
    """Reads RoPE settings in both layouts: transformers<5 (`rope_theta` + `rope_scaling`) and
    transformers>=5 (`rope_parameters`)."""
    params = dict(take("rope_parameters", None) or {})
    scaling = dict(take("rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or take("rope_theta", 10000.0)
    merged = {**scaling, **params}
    rope_type = merged.pop("rope_type", merged.pop("type", "default"))
    if rope_type == "default":
        leftover = {k: v for k, v in merged.items() if k not in ("partial_rotary_factor",)}
        if merged.get("partial_rotary_factor", 1.0) != 1.0 or leftover:
            raise UnsupportedConfigError(f"unsupported RoPE parameters {merged}")
        return float(theta), None
    if rope_type == "llama3":
        try:
            llama3 = (float(merged["factor"]), float(merged["low_freq_factor"]),
                      float(merged["high_freq_factor"]),
                      int(merged["original_max_position_embeddings"]))
        except KeyError as e:
            raise UnsupportedConfigError(f"llama3 rope scaling lacks {e}") from None
        return float(theta), llama3
    raise UnsupportedConfigError(
        f"RoPE type {rope_type!r} is not supported (psjax computes 'default' and 'llama3')")
