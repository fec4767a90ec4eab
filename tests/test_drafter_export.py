"""ParallelSpec drafter export/import: HF-style directories round-trip exactly (single file and
shards), follow transformers' tensor layout, and refuse the wrong target or a damaged file."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import psjax
import tiny_models
from psjax.convert import drafter_hf, hf
from psjax.decoding import speculative
from psjax.drafters import parallelspec
from psjax.drafters.base import Context, Prompt
from psjax.models.llama import Transformer

VOCAB = 64
K = 4


@pytest.fixture(scope="module")
def tiny():
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=VOCAB)
    config, params = hf.load_hf_dir(path)
    return Transformer(config), params, path


def _drafter(tiny, mode, seed=0, layers=()):
    module, _, _ = tiny
    drafter = parallelspec.build(parallelspec.ParallelSpecConfig(module.config, K, mode, layers),
                                 module)
    params = parallelspec.init_params(drafter, jax.random.PRNGKey(seed))
    # Fresh norms are ones and biases zeros: perturb every tensor so the round trip sees them.
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.PRNGKey(seed + 1), len(leaves))
    leaves = [x + 0.05 * jax.random.normal(key, x.shape, x.dtype) for x, key in zip(leaves, keys)]
    return drafter, jax.tree.unflatten(treedef, leaves)


def _draft_logits(drafter, params, target_params, tokens):
    b, p = tokens.shape
    hidden = jax.random.normal(jax.random.PRNGKey(3), (b, p, drafter.config.feature_size))
    lengths = jnp.full((b,), p, jnp.int32)
    context = Context(jnp.pad(tokens, ((0, 0), (0, 16))), lengths, target_params)
    state = drafter.init_state(params, Prompt(tokens, lengths, hidden), context, p + 16)
    return drafter.draft_logits(params, state, context)[0]


def _assert_same_tree(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("mode,layers", [("token", ()), ("feature", ()), ("feature", (1, 2))])
def test_round_trip(tiny, mode, layers, tmp_path):
    module, target_params, _ = tiny
    drafter, params = _drafter(tiny, mode, layers=layers)
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama")
    with open(tmp_path / "config.json") as f:
        cfg = json.load(f)
    assert cfg["architectures"] == ["ParallelSpecDrafter"]
    assert cfg["model_type"] == "parallelspec"
    assert cfg["num_masks"] == K and cfg["input_mode"] == mode
    assert cfg["feature_layers"] == list(layers)
    assert cfg["mask_token_ids"] == list(range(VOCAB, VOCAB + K))
    assert cfg["target_name"] == "tiny-llama" and cfg["torch_dtype"] == "float32"
    assert cfg["target_config"] == module.config.to_hf_dict()
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]
    names = set(hf.read_safetensors(str(tmp_path)))
    assert ("fc.weight" in names) == (mode == "feature")
    assert {"mask_embed.weight", "layer.self_attn.q_proj.weight", "norm.weight"} <= names

    loaded, loaded_params = psjax.load_drafter(str(tmp_path), target=psjax.Target(module,
                                                                                 target_params))
    assert loaded.config == drafter.config and loaded.target_module is module
    _assert_same_tree(params, loaded_params)

    tokens = jnp.asarray(np.random.RandomState(0).randint(0, VOCAB, (2, 7)), jnp.int32)
    np.testing.assert_array_equal(_draft_logits(drafter, params, target_params, tokens),
                                  _draft_logits(loaded, loaded_params, target_params, tokens))
    prompts = [[5, 9, 2, 33, 7], [1, 2, 3, 1, 2, 3, 1, 2]]
    outs = [speculative.generate(module, target_params, prompts, drafter=d, drafter_params=p,
                                 tree=4, max_new_tokens=16)
            for d, p in ((drafter, params), (loaded, loaded_params))]
    np.testing.assert_array_equal(outs[0].tokens, outs[1].tokens)
    np.testing.assert_array_equal(outs[0].accepted, outs[1].accepted)
    assert outs[0].steps == outs[1].steps


def test_hf_layout_matches_transformers(tiny, tmp_path):
    """The drafter's `layer.*` tensors are laid out exactly like a transformers decoder layer:
    a drafter whose layer is the target's layer 0 exports the target's `model.layers.0.*`."""
    _, target_params, target_dir = tiny
    drafter, params = _drafter(tiny, "feature")
    params = {**params, "layer": target_params["layers_0"]}
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama")
    ours = hf.read_safetensors(str(tmp_path))
    theirs = hf.read_safetensors(target_dir)
    layer = [n for n in ours if n.startswith("layer.")]
    assert len(layer) == 9  # q k v o, gate up down, two norms (Llama: no biases)
    for name in layer:
        np.testing.assert_array_equal(ours[name], theirs["model.layers.0." + name[6:]])
    d = drafter.config.target.hidden_size
    assert ours["fc.weight"].shape == (d, 2 * d)  # HF's [out, in]
    np.testing.assert_array_equal(ours["fc.weight"], np.asarray(params["fc"]["kernel"]).T)


def test_sharded_round_trip(tiny, tmp_path):
    drafter, params = _drafter(tiny, "feature")
    limit = 30_000
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama",
                            max_shard_bytes=limit)
    files = sorted(os.listdir(tmp_path))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 1 and "model.safetensors.index.json" in files
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    with open(tmp_path / "model.safetensors.index.json") as f:
        index = json.load(f)
    assert set(index["weight_map"].values()) == set(shards)
    for shard in shards:
        tensors = safetensors.numpy.load_file(str(tmp_path / shard))
        assert len(tensors) == 1 or sum(a.nbytes for a in tensors.values()) <= limit
    _, loaded = drafter_hf.load_drafter(str(tmp_path))
    _assert_same_tree(params, loaded)


def test_bfloat16_export(tiny, tmp_path):
    drafter, params = _drafter(tiny, "token")
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama",
                            dtype=jnp.bfloat16)
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["torch_dtype"] == "bfloat16"
    loaded_drafter, loaded = drafter_hf.load_drafter(str(tmp_path), dtype="bfloat16")
    assert loaded_drafter.module.dtype == jnp.bfloat16
    for x, y in zip(jax.tree.leaves(params), jax.tree.leaves(loaded)):
        assert y.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(x.astype(jnp.bfloat16)), np.asarray(y))


def test_other_vocabulary_refused(tiny, tmp_path):
    drafter, params = _drafter(tiny, "feature")
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama")
    _, other_dir = tiny_models.make("llama_gqa_untied", vocab_size=80)
    other = psjax.load_target(other_dir, tokenizer=False)
    for target in (other, other.config):
        with pytest.raises(ValueError, match=r"this drafter was trained for tiny-llama "
                           r"\(vocab 64\); the target has vocab 80: load the matching target "
                           r"or train a drafter for it"):
            drafter_hf.load_drafter(str(tmp_path), target=target)


def test_missing_tensor_named(tiny, tmp_path):
    drafter, params = _drafter(tiny, "feature")
    drafter_hf.save_drafter(str(tmp_path), drafter.config, params, "tiny-llama")
    file = str(tmp_path / "model.safetensors")
    state = safetensors.numpy.load_file(file)
    del state["layer.mlp.up_proj.weight"]
    safetensors.numpy.save_file(state, file)
    with pytest.raises(hf.MissingTensorError, match="'layer.mlp.up_proj.weight' is missing"):
        drafter_hf.load_drafter(str(tmp_path))


def test_not_a_drafter_directory(tiny):
    _, _, target_dir = tiny
    with pytest.raises(ValueError, match="model_type='llama'.*psjax.load_target"):
        drafter_hf.load_drafter(target_dir)
