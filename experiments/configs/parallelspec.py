"""ParallelSpec drafter training configs: `--config experiments/configs/parallelspec.py:VARIANT`.

Variants:
  tiny    a tiny random target distilled on its own answers to random prompts (CPU, ~1 min);
          what CI runs:
            python experiments/train_drafter.py \\
              --config experiments/configs/parallelspec.py:tiny --workdir /tmp/ps_tiny
  smollm2 SmolLM2-135M-Instruct on self-distilled ShareGPT (GPU):
            python experiments/generate_data.py --target smollm2-135m-instruct ...
            python experiments/train_drafter.py \\
              --config experiments/configs/parallelspec.py:smollm2 --workdir workdir/ps_smollm2
  qwen05b Qwen2.5-Coder-0.5B-Instruct, likewise.
Override anything from the command line, e.g. `--config.drafter.num_masks=8`.
"""

import ml_collections

TINY_TARGET = dict(model_type="llama", vocab_size=128, hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=512, tie_word_embeddings=True)


def get_config(variant: str = "smollm2") -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.target = "smollm2-135m-instruct"  # registry name, HF directory, or "random" (tiny)
    c.target_random_config = ml_collections.ConfigDict(TINY_TARGET)
    c.target_dtype = "bfloat16"
    c.compute_dtype = "bfloat16"

    # k = 3 (4 drafts a pass): trained apart from scratch on Qwen2.5-Coder-0.5B, fewer masks
    # drafted better at every depth they share, and k = 3 drafted as well as k = 7 drafters
    # trained for hours (docs/parallelspec.md, "k trained apart", "Training length").
    # feature_layers: the target layers the drafter reads (`--config.drafter.feature_layers=
    # 2,12,24` for Qwen2.5-0.5B: low, middle and last, as EAGLE-3 fuses them); empty: the last
    # hidden state alone.
    c.drafter = ml_collections.ConfigDict(dict(num_masks=3, input_mode="feature",
                                               feature_layers=()))

    c.data = ml_collections.ConfigDict()
    # "tfds": the SelfDistilled ArrayRecord dataset; "jsonl": its source shards (machines
    # without tensorflow-datasets); "random_prompts": distil random prompts now (tiny).
    c.data.source = "tfds"
    c.data.data_dir = "workdir/tfds"
    # experiments/generate_data.py --out_dir; "jsonl" reads several, comma-separated.
    c.data.jsonl_dir = "workdir/distilled/smollm2"
    c.data.holdout = 256  # sequences kept out of training; holdout_* metrics at eval_every
    c.data.num_random_prompts = 0
    c.data.random_prompt_length = 0
    c.data.random_answer_length = 0
    c.max_length = 512

    c.batch_size = 16
    c.total_steps = 2000
    c.learning_rate = 1e-3
    c.warmup_steps = 100
    c.weight_decay = 0.0
    c.clip_norm = 1.0
    c.max_nonfinite_steps = 20  # non-finite steps are skipped; this many in a row stop the run
    c.grad_accum = 1
    # depth_decay 0.8 (draft d weighs 0.8^d; it was 1.0): from scratch on Qwen2.5-Coder-0.5B at
    # k = 4 and k = 8 it gave a higher tau overall at every chain length and tree size (fitted
    # 64-node tree 2.029 -> 2.106, 1.976 -> 2.065; results/train_h200/k_sweep_depth_decay/).
    c.loss = ml_collections.ConfigDict(dict(soft_weight=1.0, hard_weight=0.1, num_anchors=64,
                                            dense_weight=0.0, depth_decay=0.8))
    c.seed = 0
    c.mesh = (1, -1, 1)  # data, fsdp, tensor; -1 takes the remaining devices
    c.num_devices = 0  # 0: every device JAX sees
    c.log_every = 20
    c.checkpoint_every = 500
    c.keep_checkpoints = 3
    c.init_from = ""  # a training workdir or an exported drafter directory: params only
    c.peak_tflops = 989.0
    c.eval_every = 500
    c.eval_prompts = 8  # held-out Spec-Bench prompts for the periodic tau evaluation
    c.eval_max_new_tokens = 64
    c.spec_bench = "../shared/data/spec_bench/question.jsonl"
    c.export_max_shard_mb = 15

    if variant == "tiny":
        c.target = "random"
        c.target_dtype = "float32"
        c.compute_dtype = "float32"
        c.data.source = "random_prompts"
        c.data.num_random_prompts = 64
        c.data.holdout = 16
        c.data.random_prompt_length = 8
        c.data.random_answer_length = 24
        c.max_length = 32
        c.batch_size = 8
        c.total_steps = 20
        c.learning_rate = 3e-3
        c.warmup_steps = 2
        c.loss.num_anchors = 32
        c.log_every = 5
        c.checkpoint_every = 10
        c.eval_every = 20
        c.eval_prompts = 4
        c.eval_max_new_tokens = 16
        c.peak_tflops = 1.0
    elif variant == "qwen05b":
        c.target = "qwen2.5-coder-0.5b-instruct"
        c.data.jsonl_dir = "workdir/distilled/qwen05b"
    elif variant != "smollm2":
        raise ValueError(f"unknown variant {variant!r}: tiny, smollm2 or qwen05b")
    return c
