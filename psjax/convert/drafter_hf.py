"""ParallelSpec drafters <-> Hugging Face-style directories.

A drafter directory is `config.json` (`model_type: "parallelspec"`, k, the mask token ids, the
input mode, the target layers it reads (`feature_layers`, empty: the last hidden state), and the
HF config of the target it was trained for) plus safetensors weights with HF-style names:
`mask_embed.weight` [k, D]; feature mode only `mask_feature` [F], `fc.weight` [D, D + F] (HF's
[out, in]; F = D x max(1, number of feature layers)) and `fc.bias`; `layer.*` named like one of
the target's decoder layers
(`layer.self_attn.q_proj.weight`, ...); `norm.weight`. The drafter owns no embedding table or LM
head: it borrows the target's, so loading checks that the target is the one it was trained for.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from psjax.convert import hf
from psjax.drafters import parallelspec
from psjax.drafters.draft_vocab import load as load_draft_vocab
from psjax.models.config import ModelConfig
from psjax.models.llama import Transformer

MODEL_TYPE = "parallelspec"
ARCHITECTURE = "ParallelSpecDrafter"
_DEFAULT_MAX_SHARD_BYTES = 2 << 30


def mapping(config: parallelspec.ParallelSpecConfig
            ) -> Iterator[tuple[str, tuple[str, ...], bool]]:
    """Yields (HF name, psjax path, transpose) for every tensor of the drafter."""
    yield "mask_embed.weight", ("mask_embed",), False
    if config.input_mode == "feature":
        yield "mask_feature", ("mask_feature",), False
        yield "fc.weight", ("fc", "kernel"), True
        yield "fc.bias", ("fc", "bias"), False
    yield from hf.layer_mapping(config.layer_config, "layer", ("layer",))
    yield "norm.weight", ("norm", "scale"), False


# --- config ---------------------------------------------------------------------------------------

def config_to_dict(config: parallelspec.ParallelSpecConfig) -> dict[str, Any]:
    """The drafter's own config (JSON-able): what `config_from_dict` reads back."""
    return {"num_masks": config.num_masks, "input_mode": config.input_mode,
            "feature_layers": list(config.feature_layers),
            "target_config": config.target.to_hf_dict()}


def _model_config(target_config: Mapping[str, Any] | ModelConfig) -> ModelConfig:
    if isinstance(target_config, ModelConfig):
        return target_config
    fields = {f.name for f in dataclasses.fields(ModelConfig)}
    if "architectures" not in target_config and set(target_config) <= fields:
        # dataclasses.asdict(ModelConfig) form (JSON turns the rope tuple into a list).
        d = dict(target_config)
        if d.get("rope_llama3_scaling") is not None:
            d["rope_llama3_scaling"] = tuple(d["rope_llama3_scaling"])
        return ModelConfig(**d)
    return ModelConfig.from_hf_dict(target_config)


def config_from_dict(d: Mapping[str, Any]) -> parallelspec.ParallelSpecConfig:
    """Reads `config_to_dict`'s output (or a drafter config.json). `target_config` may be the
    target's HF dict, `dataclasses.asdict(ModelConfig)` or a ModelConfig."""
    for key in ("num_masks", "input_mode", "target_config"):
        if key not in d:
            raise ValueError(f"the drafter config lacks {key!r} (has {sorted(d)})")
    return parallelspec.ParallelSpecConfig(
        target=_model_config(d["target_config"]), num_masks=int(d["num_masks"]),
        input_mode=d["input_mode"],
        # Drafters exported before feature_layers existed read the last hidden state.
        feature_layers=tuple(int(n) for n in d.get("feature_layers", ())))


# --- export ---------------------------------------------------------------------------------------

def save_drafter(path: str, drafter_config: parallelspec.ParallelSpecConfig, params: Mapping,
                 target_name: str, dtype=np.float32,
                 max_shard_bytes: int = _DEFAULT_MAX_SHARD_BYTES) -> None:
    """Writes the drafter as an HF-style directory (shards of at most `max_shard_bytes` each,
    with `model.safetensors.index.json`, when one file would be larger)."""
    bad = [jax.tree_util.keystr(path) for path, x in jax.tree_util.tree_leaves_with_path(params)
           if not np.isfinite(np.asarray(x, np.float32)).all()]
    if bad:
        raise ValueError(f"the drafter's parameters {bad[:3]} (and {max(len(bad) - 3, 0)} more) "
                         "are not finite: its training diverged; export a checkpoint from "
                         "before (experiments/export_hf.py --step)")
    hf_config = {
        "architectures": [ARCHITECTURE],
        "model_type": MODEL_TYPE,
        **config_to_dict(drafter_config),
        "mask_token_ids": list(drafter_config.mask_token_ids),
        "target_name": target_name,
        "torch_dtype": np.dtype(dtype).name,
    }
    state = hf.state_dict_from_table(params, mapping(drafter_config), dtype)
    hf.save_state_dict(path, state, hf_config, max_shard_bytes)


# --- import ---------------------------------------------------------------------------------------

def _target_module(target, config: ModelConfig, dtype) -> Transformer:
    if target is None:
        return Transformer(config, dtype=dtype, param_dtype=dtype)
    if isinstance(target, Transformer):
        return target
    if isinstance(target, ModelConfig):
        return Transformer(target, dtype=dtype, param_dtype=dtype)
    if hasattr(target, "module") and isinstance(target.module, Transformer):  # psjax Target
        return target.module
    raise TypeError(f"target must be a psjax Target, a Transformer or a ModelConfig, "
                    f"got {type(target).__name__}")


def check_target(config: parallelspec.ParallelSpecConfig, target_config: ModelConfig,
                 target_name: str = "another target") -> None:
    """Refuses a target whose shapes or numerics differ from the one the drafter was trained
    for: the drafter reuses its embedding table, LM head and last hidden states."""
    trained = config.target
    diffs = [f.name for f in dataclasses.fields(ModelConfig)
             if getattr(trained, f.name) != getattr(target_config, f.name)]
    if not diffs:
        return
    label = lambda n: "vocab" if n == "vocab_size" else n  # noqa: E731
    ours = ", ".join(f"{label(n)} {getattr(trained, n)}" for n in diffs)
    theirs = ", ".join(f"{label(n)} {getattr(target_config, n)}" for n in diffs)
    raise ValueError(f"this drafter was trained for {target_name} ({ours}); the target has "
                     f"{theirs}: load the matching target or train a drafter for it")


def load_drafter(path: str, target=None, dtype=jnp.float32, draft_vocab: int | None = None
                 ) -> tuple[parallelspec.ParallelSpec, Any]:
    """Reads a directory written by `save_drafter` -> (ParallelSpec drafter, params).

    `target` (a psjax Target, its Transformer module or its ModelConfig) is checked against the
    target the drafter was trained for; its module becomes the drafter's `target_module`.
    Without it, the module is rebuilt from the recorded target config. `draft_vocab` N: the
    drafter proposes from the N tokens most frequent in its training answers only (the ranking
    in the directory, psjax.drafters.draft_vocab)."""
    dtype = jnp.dtype(dtype)
    config_path = os.path.join(path, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{config_path} does not exist: a drafter directory needs the "
                                "config.json that psjax.convert.drafter_hf.save_drafter writes")
    with open(config_path) as f:
        raw = json.load(f)
    model_type = raw.get("model_type")
    if model_type != MODEL_TYPE:
        hint = (" (this looks like a target model directory: load it with psjax.load_target)"
                if model_type in ("llama", "qwen2", "mistral") else "")
        raise ValueError(f"{path} has model_type={model_type!r}; a ParallelSpec drafter "
                         f"directory has model_type={MODEL_TYPE!r}{hint}")
    config = config_from_dict(raw)
    target_name = raw.get("target_name", "an unnamed target")
    recorded = raw.get("mask_token_ids")
    if recorded is not None and tuple(recorded) != config.mask_token_ids:
        raise ValueError(f"{path} records mask_token_ids {recorded} but psjax places the "
                         f"{config.num_masks} masks at {list(config.mask_token_ids)}")
    module = _target_module(target, config.target, dtype)
    if target is not None:
        check_target(config, module.config, target_name)
    vocab = (None if draft_vocab is None
             else load_draft_vocab(path, draft_vocab, config.target.vocab_size))
    drafter = parallelspec.build(config, module, dtype, draft_vocab=vocab)

    state = hf.read_safetensors(path)
    shapes = jax.eval_shape(lambda: parallelspec.init_params(drafter, jax.random.PRNGKey(0)))
    params, expected = hf.params_from_table(
        state, mapping(config), dtype, path,
        f"a ParallelSpec drafter ({config.input_mode} mode, k={config.num_masks})")
    for name, tree_path, transpose in mapping(config):
        got, want = params, shapes
        for key in tree_path:
            got, want = got[key], want[key]
        if got.shape != want.shape:
            need = want.shape[::-1] if transpose else want.shape
            raise ValueError(f"tensor {name!r} of {path} has shape {state[name].shape} but the "
                             f"drafter needs {need}")
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise ValueError(f"{path} has tensors a {config.input_mode}-mode ParallelSpec drafter "
                         f"does not have: {unexpected[:8]}")
    return drafter, params
