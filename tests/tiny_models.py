"""Tiny random HF models saved to disk: the reference side of the parity tests."""

import tempfile

import torch
import transformers

VARIANTS = {
    # name: (model class, config class, overrides)
    "llama_mha_tied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                       dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "llama_gqa_untied": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                         dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "llama3_rope_scaling": (transformers.LlamaForCausalLM, transformers.LlamaConfig,
                            dict(num_key_value_heads=2, rope_theta=500000.0,
                                 rope_scaling={"rope_type": "llama3", "factor": 8.0,
                                               "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                               "original_max_position_embeddings": 64})),
    "qwen2_gqa_untied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                         dict(num_key_value_heads=2, tie_word_embeddings=False)),
    "qwen2_mha_tied": (transformers.Qwen2ForCausalLM, transformers.Qwen2Config,
                       dict(num_key_value_heads=4, tie_word_embeddings=True)),
    "mistral_gqa": (transformers.MistralForCausalLM, transformers.MistralConfig,
                    dict(num_key_value_heads=2, sliding_window=None)),
}


def make(name: str, seed: int = 0, vocab_size: int = 160, num_layers: int = 2):
    """Returns (torch model in eval mode, its saved HF directory)."""
    model_cls, config_cls, overrides = VARIANTS[name]
    config = config_cls(vocab_size=vocab_size, hidden_size=64, intermediate_size=96,
                        num_hidden_layers=num_layers, num_attention_heads=4,
                        max_position_embeddings=512, **overrides)
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    # Random init leaves norms at 1 and biases at 0: perturb them so the test sees them.
    with torch.no_grad():
        for name_, p in model.named_parameters():
            if "norm" in name_ or name_.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    path = tempfile.mkdtemp(prefix=f"psjax_{name}_")
    model.save_pretrained(path)
    return model, path
