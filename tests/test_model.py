"""The target model computes what transformers computes; import, export and sharding agree."""

import json
import os
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import tiny_models
from psjax import sharding
from psjax.convert import hf
from psjax.models.config import ModelConfig, UnsupportedConfigError
from psjax.models import attention_kernel, kv_cache, llama
from psjax.models.kv_cache import KVCache
from psjax.models.llama import Transformer


def _forward(config, params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    return np.asarray(Transformer(config).apply({"params": params}, jnp.asarray(tokens),
                                                jnp.asarray(positions)).logits)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()


def _rel_err(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("variant", sorted(tiny_models.VARIANTS))
def test_logits_match_transformers(variant):
    model, path = tiny_models.make(variant)
    config, params = hf.load_hf_dir(path)
    tokens = np.random.RandomState(1).randint(0, config.vocab_size, (2, 80))
    ours, ref = _forward(config, params, tokens), _torch_logits(model, tokens)
    assert _rel_err(ours, ref) < 1e-4, (variant, _rel_err(ours, ref))


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_fused_projections_compute_the_same(variant):
    """fused=True (q/k/v and gate/up as one matmul each) reads the same HF-layout parameters."""
    _, path = tiny_models.make(variant)
    config, params = hf.load_hf_dir(path)
    tokens = jnp.asarray(np.random.RandomState(4).randint(0, config.vocab_size, (2, 24)))
    positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    plain = Transformer(config).apply({"params": params}, tokens, positions).logits
    fused = Transformer(config, fused=True).apply({"params": params}, tokens, positions).logits
    np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


def test_attention_paths_agree(monkeypatch):
    """attend's multiply-and-sum and matmul forms (chosen by llama.MULTIPLY_SUM_PAIRS and
    MULTIPLY_SUM_QUERIES from batch, queries and slots) give the same attention, masked slots
    included."""
    rs = np.random.RandomState(5)
    q = jnp.asarray(rs.randn(3, 4, 2, 3, 16), jnp.float32)  # [B, T, K, G, H]
    keys, values = (jnp.asarray(rs.randn(3, 40, 2, 16), jnp.float32) for _ in range(2))
    mask = jnp.asarray(rs.rand(3, 4, 40) < 0.7)
    outs = []
    monkeypatch.setattr(llama, "MULTIPLY_SUM_QUERIES", 10**9)
    for pairs in (10**9, 0):  # every call multiply-and-sum, then every call matmuls
        monkeypatch.setattr(llama, "MULTIPLY_SUM_PAIRS", pairs)
        outs.append(llama.attend(q, keys, values, mask, jnp.float32))
    np.testing.assert_allclose(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    # The matmul form through jax.nn.dot_product_attention (its XLA implementation here; the
    # cuDNN one needs a GPU): same head grouping, same mask.
    fused = llama.attend(q, keys, values, mask, jnp.float32, implementation="xla")
    np.testing.assert_allclose(fused, outs[0], rtol=1e-5, atol=1e-5)
    # The chunked form (softmax within chunks of slots, then across them), with a chunk no
    # query sees; a cache the chunk does not divide takes the einsum form.
    monkeypatch.setattr(llama, "SLOT_CHUNK", 8)
    hidden_chunk = mask.at[:, :, 16:24].set(False)
    for m in (mask, hidden_chunk):
        chunked = llama.attend(q, keys, values, m, jnp.float32, implementation="chunked")
        want = llama.attend(q, keys, values, m, jnp.float32, implementation="einsum")
        np.testing.assert_allclose(chunked, want, rtol=1e-5, atol=1e-5)
        # The same chunks as one Pallas kernel (interpreted here), chunks of 16 slots.
        kernel = attention_kernel.attend(q, keys[:, :32], values[:, :32], m[..., :32],
                                         jnp.float32, 16)
        np.testing.assert_allclose(kernel, llama.attend(
            q, keys[:, :32], values[:, :32], m[..., :32], jnp.float32, implementation="einsum"),
            rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="chunks of 16"):
        attention_kernel.attend(q, keys, values, mask, jnp.float32, 16)  # 40 slots
    # Query rows padded past what they need (MIN_QUERY_ROWS; 6 rows a KV head here): the same
    # attention. A query count not traced above, so the jitted kernel traces anew.
    monkeypatch.setattr(attention_kernel, "MIN_QUERY_ROWS", 64)
    few_rows = lambda q: attention_kernel.attend(q, keys[:, :32], values[:, :32],
                                                 mask[:, :2, :32], jnp.float32, 16)
    assert "f32[3,2,64,16]" in str(jax.make_jaxpr(few_rows)(q[:, :2]))  # [B, K, rows, H]
    np.testing.assert_allclose(few_rows(q[:, :2]), llama.attend(
        q[:, :2], keys[:, :32], values[:, :32], mask[:, :2, :32], jnp.float32),
        rtol=1e-5, atol=1e-5)
    # A cache's every layer [L, B, S, K, H] with the layer to read: the kernel reads it in place,
    # the other forms take the slice.
    stacked = [jnp.stack([jnp.zeros_like(x), x]) for x in (keys, values)]
    for form in ("pallas", "chunked", "einsum"):
        np.testing.assert_allclose(llama.attend(q, *stacked, mask, jnp.float32, form, layer=1),
                                   outs[0], rtol=1e-5, atol=1e-5)
    jaxpr = lambda s, form="chunked": str(jax.make_jaxpr(lambda q: llama.attend(
        q, keys[:, :s], values[:, :s], mask[..., :s], jnp.float32, implementation=form))(q))
    assert "8,2,16" in jaxpr(40) and "8,2,16" not in jaxpr(39)  # keys as [B, 5, 8, K, H]
    # The default picks the Pallas kernel on a GPU only; here the chunked form.
    assert llama.MATMUL_ATTENTION == "fastest"
    assert llama.matmul_attention_form("fastest") == "chunked"
    assert llama.numerics()["matmul_attention"] == "chunked"
    assert jaxpr(40, "fastest") == jaxpr(40)
    # One-token steps: multiply-and-sum in front of the XLA forms, by default; the kernel takes
    # them where it is the form.
    monkeypatch.setattr(llama, "MULTIPLY_SUM_PAIRS", None)
    monkeypatch.setattr(llama, "MULTIPLY_SUM_QUERIES", 1)
    assert (llama.multiply_sum_pairs("pallas"), llama.multiply_sum_pairs("chunked")) == (0, 14_336)
    assert llama.numerics()["multiply_sum_pairs"] == 14_336
    before = llama.numerics()
    with llama.numerics_as(kernel_min_rows=128, gemm_min_rows=16):  # set for the block only
        assert (attention_kernel.MIN_QUERY_ROWS, llama.gemm_min_rows()) == (128, 16)
        with llama.numerics_as(multiply_sum_pairs=None):  # None: the per-form default
            assert llama.multiply_sum_pairs("pallas") == 0
    assert llama.numerics() == before
    for bad in (dict(kernel_min_rows=24), dict(matmul_attention="flash"), dict(gemm_min_rows="x")):
        with pytest.raises(ValueError, match=f"{next(iter(bad))}=.*it takes"):
            with llama.numerics_as(**bad):
                pass
    assert llama.numerics() == before
    step = lambda q, form: llama.attend(q, keys, values, mask[:, :1], jnp.float32, form)
    step_jaxpr = lambda form: str(jax.make_jaxpr(lambda q: step(q, form))(q[:, :1]))
    assert "pallas_call" in step_jaxpr("pallas") and "dot_general" not in step_jaxpr("chunked")
    np.testing.assert_allclose(step(q[:, :1], "pallas"), step(q[:, :1], "chunked"),
                               rtol=1e-5, atol=1e-5)


def test_einsum_float32_gradient_is_autodiffs_in_float32():
    """attend's score product keeps its float32 output but computes its backward in the inputs'
    dtype (as llama.matmul): in float32 that is autodiff's gradient."""
    rs = np.random.RandomState(7)
    a, b = jnp.asarray(rs.randn(2, 5, 3), jnp.float32), jnp.asarray(rs.randn(2, 4, 3), jnp.float32)
    spec = "bth,bsh->bts"
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(f(a, b)))
    ours = jax.grad(loss(lambda a, b: llama.einsum_float32(spec, a, b)), argnums=(0, 1))(a, b)
    ref = jax.grad(loss(lambda a, b: jnp.einsum(spec, a, b)), argnums=(0, 1))(a, b)
    for x, y in zip(ours, ref):
        np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-6)
    grads = jax.grad(loss(lambda a, b: llama.einsum_float32(spec, a, b)), argnums=(0, 1))(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16))
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_attention_form_by_default():
    """By default only one-token steps take multiply-and-sum (in front of the XLA forms; in front
    of the Pallas kernel none do: test_attention_paths_agree); a verify pass of several queries
    takes the matmul form (dot_generals) even over a short cache."""
    rs = np.random.RandomState(6)
    keys, values = (jnp.asarray(rs.randn(1, 40, 2, 16), jnp.float32) for _ in range(2))

    def uses_matmuls(t):
        q = jnp.asarray(rs.randn(1, t, 2, 3, 16), jnp.float32)
        mask = jnp.ones((1, t, 40), bool)
        jaxpr = jax.make_jaxpr(lambda q: llama.attend(q, keys, values, mask, jnp.float32))(q)
        return "dot_general" in str(jaxpr)

    assert not uses_matmuls(1) and uses_matmuls(2) and uses_matmuls(9)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_uncached_attention_implementation_computes_the_same(variant):
    """A pass over whole sequences (the trainer's target pass) through
    jax.nn.dot_product_attention's causal mode (its XLA implementation here; cuDNN's on a GPU)
    gives the einsum form's hidden states and logits."""
    _, path = tiny_models.make(variant)
    config, params = hf.load_hf_dir(path)
    tokens = jnp.asarray(np.random.RandomState(6).randint(0, config.vocab_size, (2, 24)))
    positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    plain = Transformer(config).apply({"params": params}, tokens, positions)
    causal = Transformer(config, uncached_attention="xla").apply({"params": params}, tokens,
                                                                 positions)
    np.testing.assert_allclose(causal.hidden, plain.hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(causal.logits, plain.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["einsum", "xla"])
def test_prefill_attends_among_the_prompt_only(attention):
    """A prompt pass into an empty cache with `prefill` (the prompt attends among itself, as
    `uncached_attention` does) gives the logits, features and cache of the pass over every slot
    of the cache with the empty ones masked; a step after it continues the same."""
    _, path = tiny_models.make("llama_gqa_untied")
    config, params = hf.load_hf_dir(path)
    module = Transformer(config, uncached_attention=attention, feature_layers=(1,))
    tokens = jnp.asarray(np.random.RandomState(8).randint(0, config.vocab_size, (2, 16)))
    positions = jnp.broadcast_to(jnp.arange(16), tokens.shape)
    cache = KVCache.create(config, 2, 40, jnp.float32)
    outs = [module.apply({"params": params}, tokens, positions, cache, prefill=prefill)
            for prefill in (False, True)]
    for a, b in zip(outs[0][:2] + (outs[0].features,), outs[1][:2] + (outs[1].features,)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree.leaves(outs[0].cache), jax.tree.leaves(outs[1].cache)):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)
    step = [module.apply({"params": params}, tokens[:, :1], jnp.full((2, 1), 16),
                         out.cache.commit(jnp.full((2,), 16))).logits for out in outs]
    np.testing.assert_allclose(step[1], step[0], rtol=1e-5, atol=1e-5)


def test_cache_writes_and_moves_rows_apart():
    """kv_cache.write puts a layer's new entries after each row's own length and nowhere else;
    gather_new moves a path of uncommitted entries into place in every layer at once, each row
    by its own offsets."""
    config = ModelConfig(vocab_size=16, hidden_size=8, intermediate_size=8, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=4,
                         max_position_embeddings=16)
    cache = KVCache.create(config, 2, 12, jnp.float32).replace(lengths=jnp.array([2, 5]))
    new = jnp.arange(1, 1 + 2 * 4 * 4, dtype=jnp.float32).reshape(2, 4, 1, 4)  # [B, T, K, H]
    k = cache.k
    for layer in range(3):
        k = kv_cache.write(k, layer, new * (layer + 1), cache.lengths)
    for layer in range(3):
        np.testing.assert_array_equal(k[layer, 0, 2:6], new[0] * (layer + 1))
        np.testing.assert_array_equal(k[layer, 1, 5:9], new[1] * (layer + 1))
    assert float(jnp.abs(k).sum()) == 6 * float(new.sum())  # nothing else written
    moved = cache.replace(k=k, v=k).gather_new(jnp.array([[0, 2, 3], [0, 1, 3]]))
    for layer in range(3):
        for row, start, picks in ((0, 2, [0, 2, 3]), (1, 5, [0, 1, 3])):
            np.testing.assert_array_equal(moved.k[layer, row, start:start + 3],
                                          new[row, jnp.array(picks)] * (layer + 1))
    np.testing.assert_array_equal(moved.v, moved.k)


def test_mlp_hidden_dtype_rounds_only_the_mlp_hidden_array():
    """mlp_hidden_dtype (bfloat16 in the trainer's target pass) rounds gate, up and their
    product, nothing else: with float32 compute it is the same model; in bfloat16 its logits
    stay as close to float32's as the default's."""
    _, path = tiny_models.make("qwen2_mha_tied")
    config, params = hf.load_hf_dir(path)
    tokens = jnp.asarray(np.random.RandomState(8).randint(0, config.vocab_size, (2, 24)))
    positions = jnp.broadcast_to(jnp.arange(24), tokens.shape)
    logits = lambda **kw: Transformer(config, **kw).apply({"params": params}, tokens,
                                                         positions).logits
    exact = logits()
    np.testing.assert_array_equal(logits(mlp_hidden_dtype=jnp.float32), exact)
    bf16 = logits(dtype=jnp.bfloat16)
    bf16_hidden = logits(dtype=jnp.bfloat16, mlp_hidden_dtype=jnp.bfloat16)
    assert not np.array_equal(bf16_hidden, bf16)
    assert _rel_err(bf16_hidden, exact) < 1.5 * _rel_err(bf16, exact)


def test_matmul_backward():
    """llama.matmul (every projection): in float32 autodiff's gradients; in bfloat16, with a
    float32 output, gradients within bfloat16 rounding of float32's. (That its backward
    products are bfloat16 ones: test_bfloat16_train_step_has_no_float32_products.)"""
    rs = np.random.RandomState(9)
    x, kernel = rs.randn(2, 5, 8).astype(np.float32), rs.randn(8, 6).astype(np.float32)
    loss = lambda product: lambda x, k: jnp.sum(jnp.sin(product(x, k)))
    ours = jax.grad(loss(lambda x, k: llama.matmul(x, k, jnp.float32)), argnums=(0, 1))
    autodiff = jax.grad(loss(lambda x, k: jnp.einsum("...d,df->...f", x, k)), argnums=(0, 1))
    for a, b in zip(ours(x, kernel), autodiff(x, kernel)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    x16, kernel16 = jnp.asarray(x, jnp.bfloat16), jnp.asarray(kernel, jnp.bfloat16)
    for a, b in zip(ours(x16, kernel16), autodiff(x, kernel)):
        assert a.dtype == jnp.bfloat16 and _rel_err(np.asarray(a, np.float32), b) < 2e-2


def test_single_row_products_are_two_row_gemms(monkeypatch):
    """A one-row product (a batch-1 decode step's projections) with a kernel of at least
    llama.GEMM_PAD_MIN_WEIGHTS weights is padded to llama.GEMM_MIN_ROWS rows (GPUs: 2; here set
    for the CPU) behind optimization barriers, so XLA keeps a GEMM; the row's result is
    unchanged, and products of more rows, or smaller kernels, are left alone."""
    monkeypatch.setattr(llama, "GEMM_MIN_ROWS", {jax.default_backend(): 2})
    monkeypatch.setattr(llama, "GEMM_PAD_MIN_WEIGHTS", 48)
    rs = np.random.RandomState(10)
    kernel, small = jnp.asarray(rs.randn(8, 6), jnp.float32), jnp.asarray(rs.randn(8, 5))
    product = jax.jit(lambda x, k: llama.matmul(x, k, jnp.float32))
    one, three = (jnp.asarray(rs.randn(1, n, 8), jnp.float32) for n in (1, 3))
    padded = lambda x, k: "optimization_barrier" in product.lower(x, k).as_text()
    assert padded(one, kernel) and not padded(three, kernel) and not padded(one, small)
    plain = jnp.einsum("...d,df->...f", one, kernel)
    np.testing.assert_allclose(product(one, kernel), plain, rtol=1e-6, atol=1e-6)
    monkeypatch.setattr(llama, "GEMM_MIN_ROWS", {})
    jax.clear_caches()
    assert not padded(one, kernel)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_features_are_the_normalised_layer_inputs(variant):
    """feature_layers (what a multi-layer feature drafter reads): the residual stream after n
    layers through layer n + 1's input norm, as transformers computes them, and the final
    hidden state for n = L."""
    model, path = tiny_models.make(variant, num_layers=3)
    config, params = hf.load_hf_dir(path)
    tokens = np.random.RandomState(7).randint(0, config.vocab_size, (2, 20))
    positions = jnp.broadcast_to(jnp.arange(20), tokens.shape)
    out = Transformer(config, feature_layers=(1, 2, 3)).apply(
        {"params": params}, jnp.asarray(tokens), positions)
    with torch.no_grad():
        ref = model(torch.tensor(tokens), output_hidden_states=True)
        expected = [model.model.layers[n].input_layernorm(ref.hidden_states[n]).numpy()
                    for n in (1, 2)]
    d = config.hidden_size
    for i, want in enumerate(expected):
        assert _rel_err(np.asarray(out.features[..., i * d:(i + 1) * d]), want) < 1e-5
    np.testing.assert_array_equal(out.features[..., 2 * d:], out.hidden)
    assert _rel_err(np.asarray(out.hidden), ref.hidden_states[3].numpy()) < 1e-5
    plain = Transformer(config).apply({"params": params}, jnp.asarray(tokens), positions)
    np.testing.assert_array_equal(plain.features, plain.hidden)
    with pytest.raises(ValueError, match="must lie in 1..3"):
        Transformer(config, feature_layers=(0,)).apply({"params": params}, jnp.asarray(tokens),
                                                       positions)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_export_round_trip(variant):
    model, path = tiny_models.make(variant, seed=3)
    config, params = hf.load_hf_dir(path)
    out = tempfile.mkdtemp()
    # A small shard limit forces the sharded `model-0000N-of-0000M` layout.
    hf.save_hf_dir(out, config, params, max_shard_bytes=64 << 10)
    assert os.path.exists(os.path.join(out, "model.safetensors.index.json"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tokens = np.random.RandomState(2).randint(0, config.vocab_size, (1, 40))
    ours = _forward(config, params, tokens)
    np.testing.assert_allclose(_torch_logits(reloaded, tokens), ours, rtol=1e-5, atol=1e-5)
    config2, params2 = hf.load_hf_dir(out)
    assert config2 == config
    np.testing.assert_array_equal(_forward(config2, params2, tokens), ours)


def test_bfloat16_weights_load(tmp_path):
    model, _ = tiny_models.make("llama_gqa_untied")
    model.to(torch.bfloat16).save_pretrained(tmp_path)
    config, params = hf.load_hf_dir(str(tmp_path), jnp.bfloat16)
    assert params["embed_tokens"]["embedding"].dtype == jnp.bfloat16


def test_sharded_forward_equals_unsharded():
    assert jax.device_count() == 8, "conftest sets 8 fake CPU devices"
    _, path = tiny_models.make("llama_gqa_untied")
    config, params = hf.load_hf_dir(path)
    module = Transformer(config)
    tokens = np.random.RandomState(0).randint(0, config.vocab_size, (8, 32)).astype(np.int32)
    positions = np.broadcast_to(np.arange(32, dtype=np.int32), tokens.shape)
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
    logical = sharding.logical_axes(
        lambda: module.init(jax.random.PRNGKey(0), tokens[:1], positions[:1]))["params"]
    param_sh = sharding.shardings(logical, params, mesh)
    sharded_params = jax.device_put(params, param_sh)
    assert sharded_params["layers_0"]["mlp"]["gate_proj"]["kernel"].sharding.spec == \
        jax.sharding.PartitionSpec("fsdp", "tensor")
    data_sh = sharding.data_sharding(mesh, 2)
    fn = jax.jit(lambda p, t, q: module.apply({"params": p}, t, q).logits,
                 in_shardings=(param_sh, data_sh, data_sh))
    with sharding.activate(mesh):
        sharded = fn(sharded_params, tokens, positions)
    np.testing.assert_allclose(np.asarray(sharded), _forward(config, params, tokens),
                               rtol=1e-5, atol=1e-5)


def test_unmatched_logical_axis_raises():
    mesh = sharding.make_mesh()
    with pytest.raises(KeyError, match="no sharding rule"):
        sharding.to_mesh_spec(jax.sharding.PartitionSpec("mystery"), (8,), mesh,
                              sharding.DEFAULT_RULES)


def test_unknown_architecture_is_refused():
    with pytest.raises(UnsupportedConfigError, match="unknown architecture model_type='gpt2'"):
        ModelConfig.from_hf_dict({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]})


def test_unhandled_attribute_is_refused():
    _, path = tiny_models.make("mistral_gqa")
    with open(os.path.join(path, "config.json")) as f:
        hf_config = json.load(f)
    with pytest.raises(UnsupportedConfigError, match="sliding_window"):
        ModelConfig.from_hf_dict({**hf_config, "sliding_window": 4096})
    with pytest.raises(UnsupportedConfigError, match="does not handle: \\['attn_logit_softcap"):
        ModelConfig.from_hf_dict({**hf_config, "attn_logit_softcap": 50.0})
    with pytest.raises(UnsupportedConfigError, match="RoPE type 'yarn'"):
        ModelConfig.from_hf_dict({**hf_config, "rope_parameters": {
            "rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4}})


def test_missing_tensor_is_named(tmp_path):
    _, path = tiny_models.make("qwen2_gqa_untied")
    state = hf.read_safetensors(path)
    del state["model.layers.1.mlp.up_proj.weight"]
    config = ModelConfig.from_hf_dir(path)
    with pytest.raises(KeyError, match="model.layers.1.mlp.up_proj.weight"):
        hf.params_from_state_dict(state, config)


def test_missing_directory_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        ModelConfig.from_hf_dir(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        hf.read_safetensors(str(tmp_path))


def test_pad_to_tiles_keeps_attention_and_its_gradients():
    """Masked cuDNN passes are padded to whole tiles (llama.CUDNN_TILE: its backward returns NaN
    at lengths 64 modulo 128); the padding changes neither the outputs nor the gradients. Checked
    through jax.nn.dot_product_attention's XLA implementation (cuDNN's needs a GPU)."""
    rs = np.random.RandomState(7)
    b, t, heads, kv_heads, h = 2, 11, 4, 2, 8
    q = jnp.asarray(rs.randn(b, t, heads, h), jnp.float32)
    k, v = (jnp.asarray(rs.randn(b, t, kv_heads, h), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((t, t), bool)) & (rs.rand(b, 1, t, t) < 0.8)
                       | np.eye(t, dtype=bool))

    def loss(q, k, v, padded):
        qq, kk, vv, mm = llama.pad_to_tiles(q, k, v, mask, tile=8) if padded else (q, k, v, mask)
        assert not padded or (qq.shape[1] == 16 and kk.shape[1] == 16 and mm.shape[2:] == (16, 16))
        out = jax.nn.dot_product_attention(qq, kk, vv, mask=mm, implementation="xla")[:, :t]
        return jnp.sum(jnp.sin(out)), out

    (_, plain), plain_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, False)
    (_, padded), padded_grads = jax.value_and_grad(loss, (0, 1, 2), has_aux=True)(q, k, v, True)
    np.testing.assert_allclose(padded, plain, rtol=1e-5, atol=1e-6)
    for got, want in zip(padded_grads, plain_grads):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_attend_pads_masked_cudnn_passes(monkeypatch):
    """attend hands cuDNN only whole tiles when it passes a mask to a pass that may be
    differentiated (the causal form, no mask, is left alone) and returns the unpadded queries'
    attention: cuDNN replaced by the XLA implementation here, which records what it was
    given."""
    seen = []
    plain_attention = jax.nn.dot_product_attention

    def recording(q, k, v, *, mask=None, is_causal=False, implementation=None):
        seen.append((q.shape[1], k.shape[1], implementation))
        return plain_attention(q, k, v, mask=mask, is_causal=is_causal, implementation="xla")

    monkeypatch.setattr(llama.jax.nn, "dot_product_attention", recording)
    monkeypatch.setattr(llama, "MULTIPLY_SUM_PAIRS", 0)
    rs = np.random.RandomState(3)
    q = jnp.asarray(rs.randn(2, 100, 2, 2, 16), jnp.float32)  # [B, T, K, G, H]
    keys, values = (jnp.asarray(rs.randn(2, 100, 2, 16), jnp.float32) for _ in range(2))
    mask = jnp.asarray(np.tril(np.ones((100, 100), bool)))[None].repeat(2, 0)
    masked = llama.attend(q, keys, values, mask, jnp.float32, implementation="cudnn")
    causal = llama.attend(q, keys, values, None, jnp.float32, implementation="cudnn")
    # Passes over a cache are never differentiated: they go unpadded.
    over_cache = llama.attend(q, keys, values, mask, jnp.float32, implementation="cudnn",
                              pad_tiles=False)
    assert seen == [(128, 128, "cudnn"), (100, 100, "cudnn"), (100, 100, "cudnn")]
    np.testing.assert_allclose(over_cache, masked, rtol=1e-5, atol=1e-5)
    want = llama.attend(q, keys, values, mask, jnp.float32)  # the einsum form
    np.testing.assert_allclose(masked, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(causal, want, rtol=1e-5, atol=1e-5)
