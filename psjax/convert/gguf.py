"""GGUF files (llama.cpp's format) -> Hugging Face config, dense weights and tokenizer files.

`read_gguf` turns the metadata into an HF `config.json` dict and dequantizes every tensor to a
float32 array under its HF name and in HF layout (`[out, in]` for linear layers). llama.cpp changed
two things on the way in that are undone here: GGUF lists shapes innermost-first (the reverse of
numpy's order), and for `llama`-arch files it permuted the rows of the Q and K projections so that
RoPE rotates adjacent pairs (GPT-J style) instead of HF's rotate-half; `qwen2` files are stored
unpermuted. Quantized files (Q4_1, Q4_K_M, ...) come out as ordinary dense weights: the
dequantized model is the model.

`write_tokenizer` builds the HF tokenizer (tokenizer.json, tokenizer_config.json with the chat
template, special tokens) from the GGUF's `tokenizer.*` metadata through transformers, and
`generation_config.json`.

Needs the `gguf` package (pure Python + numpy), imported lazily so that importing psjax does not.
"""

from __future__ import annotations

import json
import os
import re
from typing import Any, Mapping

import numpy as np

from psjax.convert import hf
from psjax.models.config import ModelConfig

# GGUF `general.architecture` -> HF model_type. llama.cpp writes Llama 1-3, Mistral (no sliding
# window) and SmolLM as "llama".
SUPPORTED_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# Architectures whose Q/K rows llama.cpp permuted (convert_hf_to_gguf.py's LlamaModel.permute).
_PERMUTED_QK = {"llama"}

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


class UnsupportedGGUFError(ValueError):
    """The GGUF describes a model psjax does not compute."""


def hf_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    m = _BLOCK_RE.match(gguf_name)
    if m and m.group(2) in _BLOCK_NAMES:
        return f"model.layers.{m.group(1)}.{_BLOCK_NAMES[m.group(2)]}.{m.group(3)}"
    raise UnsupportedGGUFError(
        f"GGUF tensor {gguf_name!r} has no counterpart in psjax's Llama-family model")


def gguf_name(hf_tensor_name: str) -> str:
    """The inverse of `hf_name` (for error messages and tests)."""
    for g, h in _GLOBAL_NAMES.items():
        if h == hf_tensor_name:
            return g
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", hf_tensor_name)
    if m:
        for g, h in _BLOCK_NAMES.items():
            if h == m.group(2):
                return f"blk.{m.group(1)}.{g}.{m.group(3)}"
    return hf_tensor_name


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's permutation of Q/K rows (rotate-half -> interleaved pairs), as its converter
    writes them. `n_head` is the number of heads of that projection (KV heads for K)."""
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The inverse of `permute_qk`: back to HF's rotate-half row order (weights and biases)."""
    return (w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _metadata(reader) -> dict[str, Any]:
    """Scalar and string fields (the large tokenizer arrays are skipped)."""
    skip = {"tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type",
            "tokenizer.ggml.scores"}
    out = {}
    for key, field in reader.fields.items():
        if key in skip:
            continue
        try:
            out[key] = field.contents()
        except Exception:  # pragma: no cover - exotic field types we do not need
            continue
    return out


def _f32(value) -> float:
    """GGUF stores float32: 9.999999747378752e-06 -> 1e-05 (the shortest repr of that float32)."""
    return float(str(np.float32(value)))


def _config_from_metadata(meta: Mapping[str, Any], tensors: Mapping[str, Any],
                          source: str) -> dict:
    arch = meta.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedGGUFError(
            f"{source}: GGUF architecture {arch!r} is not supported; psjax converts "
            f"{sorted(SUPPORTED_ARCHITECTURES)} (Llama-family decoders)")

    def get(key, default=None, required=True):
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if required and default is None:
            raise UnsupportedGGUFError(f"{source}: GGUF metadata lacks {full!r}")
        return default

    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in ("none", None) or "rope_freqs.weight" in tensors:
        raise UnsupportedGGUFError(
            f"{source}: RoPE scaling ({scaling!r}, rope_freqs tensor: "
            f"{'rope_freqs.weight' in tensors}) is not converted from GGUF; use the HF checkpoint")
    if "token_embd.weight" not in tensors:
        raise hf.MissingTensorError(
            f"tensor 'model.embed_tokens.weight' (GGUF 'token_embd.weight') is missing from "
            f"{source}")
    hidden = int(get("embedding_length"))
    heads = int(get("attention.head_count"))
    kv_heads = int(get("attention.head_count_kv", heads))
    head_dim = int(get("attention.key_length", 0, required=False) or
                   get("rope.dimension_count", 0, required=False) or hidden // heads)
    vocab = int(list(tensors["token_embd.weight"].shape)[-1])  # ggml order: [hidden, vocab]
    model_type = SUPPORTED_ARCHITECTURES[arch]
    config = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[model_type]],
        "model_type": model_type,
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim,
        "max_position_embeddings": int(get("context_length")),
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(get("rope.freq_base", 10000.0, required=False)),
        "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensors,
        "torch_dtype": "float32",
    }
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
        config["mlp_bias"] = False
    else:
        config["use_sliding_window"] = False
    for key, name in (("bos_token_id", "bos"), ("eos_token_id", "eos"),
                      ("pad_token_id", "padding")):
        value = meta.get(f"tokenizer.ggml.{name}_token_id")
        if value is not None:
            config[key] = int(value)
    return config


def _expected_shape(name: str, c: ModelConfig) -> tuple[int, ...]:
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    d, f, v = c.hidden_size, c.intermediate_size, c.vocab_size
    table = {"embed_tokens.weight": (v, d), "lm_head.weight": (v, d), "norm.weight": (d,),
             "layernorm.weight": (d,), "q_proj.weight": (q, d), "k_proj.weight": (kv, d),
             "v_proj.weight": (kv, d), "o_proj.weight": (d, q), "q_proj.bias": (q,),
             "k_proj.bias": (kv,), "v_proj.bias": (kv,), "gate_proj.weight": (f, d),
             "up_proj.weight": (f, d), "down_proj.weight": (d, f)}
    for suffix, shape in table.items():
        if name.endswith(suffix):
            return shape
    raise KeyError(name)  # pragma: no cover


def read_gguf(path: str | os.PathLike) -> tuple[dict, dict[str, np.ndarray]]:
    """(HF config.json dict, float32 state dict with HF names and shapes) of a GGUF file.

    Raises UnsupportedGGUFError (a ValueError) for an architecture or feature psjax does not
    compute, hf.MissingTensorError naming the tensor when the file lacks one the model needs."""
    import gguf  # lazy: optional dependency

    path = os.fspath(path)
    reader = gguf.GGUFReader(path)
    tensors = {t.name: t for t in reader.tensors}
    meta = _metadata(reader)
    config_dict = _config_from_metadata(meta, tensors, path)
    config = ModelConfig.from_hf_dict(config_dict)  # refuses anything psjax would not compute

    permuted = meta["general.architecture"] in _PERMUTED_QK
    state: dict[str, np.ndarray] = {}
    for name, t in tensors.items():
        target = hf_name(name)
        shape = tuple(int(s) for s in reversed(list(t.shape)))  # ggml order -> numpy order
        array = gguf.quants.dequantize(t.data, t.tensor_type)
        array = np.asarray(array, dtype=np.float32).reshape(shape)
        if permuted and ".self_attn.q_proj." in target:
            array = unpermute_qk(array, config.num_attention_heads)
        elif permuted and ".self_attn.k_proj." in target:
            array = unpermute_qk(array, config.num_key_value_heads)
        expected = _expected_shape(target, config)
        if array.shape != expected:
            raise UnsupportedGGUFError(
                f"{path}: tensor {name!r} ({target}) has shape {array.shape}, the config implies "
                f"{expected}")
        state[target] = np.ascontiguousarray(array)

    for name, _, _ in hf.mapping(config):
        if name not in state:
            raise hf.MissingTensorError(
                f"tensor {name!r} (GGUF {gguf_name(name)!r}) is missing from {path}; a "
                f"{config.architecture} with {config.num_hidden_layers} layers needs it")
    return config_dict, state


def write_tokenizer(gguf_path: str | os.PathLike, out_dir: str | os.PathLike,
                    model_max_length: int | None = None) -> Any:
    """Writes the HF tokenizer files and generation_config.json into `out_dir`; returns the
    tokenizer. The chat template is kept both as chat_template.jinja (transformers>=4.43 reads it
    first) and in tokenizer_config.json (for older readers)."""
    from transformers import AutoTokenizer

    gguf_path, out_dir = os.fspath(gguf_path), os.fspath(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(
        os.path.dirname(os.path.abspath(gguf_path)), gguf_file=os.path.basename(gguf_path),
        local_files_only=True)
    tokenizer.save_pretrained(out_dir)

    config_file = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_file) as f:
        tok_config = json.load(f)
    for key in ("is_local", "local_files_only", "name_or_path"):
        tok_config.pop(key, None)
    # TokenizersBackend is transformers-5 only; the generic fast class loads everywhere.
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    if model_max_length:
        tok_config["model_max_length"] = int(model_max_length)
    if isinstance(tokenizer.chat_template, str):
        tok_config["chat_template"] = tokenizer.chat_template
    with open(config_file, "w") as f:
        json.dump(tok_config, f, indent=2, ensure_ascii=False)

    import gguf  # lazy

    reader = gguf.GGUFReader(gguf_path)
    meta = _metadata(reader)
    ids = lambda key: meta.get(f"tokenizer.ggml.{key}_token_id")  # noqa: E731
    eos = [int(i) for i in dict.fromkeys((ids("eos"), ids("eot"), ids("eom"))) if i is not None]
    generation = {"bos_token_id": ids("bos"), "eos_token_id": eos[0] if len(eos) == 1 else eos}
    if ids("padding") is not None:
        generation["pad_token_id"] = ids("padding")
    generation = {k: v for k, v in generation.items() if v is not None and v != []}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    return tokenizer
