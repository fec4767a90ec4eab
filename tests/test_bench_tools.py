"""The GPU benchmark tools run end to end on the CPU at tiny sizes (their numbers come from the
GPU; here only that they run and report what they say)."""

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from psjax.bench import exactness, limits
from psjax.decoding import speculative
from psjax.decoding.sampling import GREEDY
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec
from psjax.models.config import ModelConfig
from psjax.models.target import random_target
from psjax.training import trainer as trainer_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(model_type="qwen2", vocab_size=96, hidden_size=32, intermediate_size=64,
            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=256, tie_word_embeddings=True)


def run_experiment(script, *args, env=(), **kwargs):
    """experiments/<script> with `args` in a subprocess from the repository root (psjax on the
    path, `env` added to the environment); subprocess.run's keyword arguments pass through."""
    return subprocess.run([sys.executable, os.path.join(REPO, "experiments", script), *args],
                          cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO, **dict(env)), **kwargs)


@pytest.mark.parametrize("name", sorted(limits.SHAPES))
def test_shapes_parse(name):
    config = limits.shape_config(name)
    assert config.num_hidden_layers >= 24


def test_unknown_shape_is_named():
    with pytest.raises(ValueError, match="llama-2-7b"):
        limits.shape_config("llama-7b")


def test_kv_bytes():
    config = limits.shape_config("llama-3-8b")  # 32 layers, 8 KV heads of 128
    assert limits.kv_bytes(config, batch=1, context=512) == 2 * 32 * 512 * 8 * 128 * 2


def test_step_times_are_positive():
    target = random_target(ModelConfig.from_hf_dict(TINY))
    prompts = [[1, 2, 3, 4]]
    # Enough steps that the loop's time stands well above the prefill's timing noise.
    prefill = limits.prefill_seconds(target.module, target.params, prompts, repeats=3)
    step, wide = (limits.ar_step_seconds(target.module, target.params, prompts, new_tokens=128,
                                         prefill=prefill, repeats=3, step_rows=rows)
                  for rows in (None, 4))
    assert prefill > 0 and step > 0 and wide > 0


def test_runs_are_timed_in_rounds():
    """per_step_seconds: one untimed call of each run, then rounds of one timed call each."""
    calls = []
    runs = {name: (lambda name=name: calls.append(name) or steps)
            for name, steps in (("a", 4), ("b", 8))}
    per_step = limits.per_step_seconds(runs, prefill=0.0, repeats=3)
    assert calls == ["a", "b"] * 4
    assert set(per_step) == {"a", "b"} and all(s >= 0 for s in per_step.values())


def test_device_trace_without_a_gpu_says_so():
    out = limits.device_trace(lambda: jnp.ones(4).block_until_ready(), steps=1)
    assert "error" in out


def test_hlo_phases_from_named_scopes():
    """A profiled kernel's phase comes from its instruction's op_name in the optimized HLO."""
    hlo = "\n".join([
        '  %fusion.7 = bf16[8] fusion(%p), metadata={op_name="jit(_generate)/while/body/verify/'
        'Transformer/layers_0/self_attn/convert_element_type" stack_frame_id=1}',
        '  ROOT %gemm_fusion_dot.2 = f32[4] fusion(%q), metadata={op_name="jit(_generate)/while/'
        'body/draft/Transformer.logits/dot_general"}',
        '  %loop_add_fusion = s32[8] fusion(%r), metadata={op_name="jit(_generate)/while/body/'
        'add"}',
        '  %wrapped_select = s32[8] fusion(%r), metadata={op_name="jit(_generate)/while/body/'
        'jit(_where)/select_n"}',
        '  %fusion.9 = f32[8] fusion(%s), metadata={op_name="jit(_generate)/Transformer/'
        'layers_0/add"}',
        # A multi-output fusion without an op_name of its own: named by its computation's ops.
        '  %input_reduce_select_fusion.23 = (f32[2], f32[8]) fusion(%t), kind=kInput, '
        'calls=%fused_reduce_select.23, metadata={deduplicated_name="input_reduce_select_fusion"}',
        '%fused_reduce_select.23 (param_0: f32[8]) -> (f32[2], f32[8]) {',
        '  %param_0 = f32[8]{0} parameter(0), metadata={scheduling_name="param_0"}',
        '  %select.1 = f32[8]{0} select(%a, %param_0, %b), metadata={op_name="jit(_generate)/'
        'while/body/verify/Transformer/layers_0/self_attn/jit(_where)/select_n"}',
        '}',
    ])
    assert limits.hlo_phases(hlo) == {"fusion.7": "verify", "gemm_fusion_dot.2": "draft",
                                      "loop_add_fusion": "loop", "wrapped_select": "loop",
                                      "fusion.9": "outside",
                                      "input_reduce_select_fusion.23": "verify",
                                      "select.1": "verify"}
    # A profiled kernel's name is its instruction's with the dot as an underscore; library
    # kernels (cuBLAS) have none.
    assert limits.kernel_ops(["fusion_7", "loop_add_fusion", "nvjet_sm90_tss"], hlo) == {
        "fusion_7": "jit(_generate)/while/body/verify/Transformer/layers_0/self_attn/"
                    "convert_element_type",
        "loop_add_fusion": "jit(_generate)/while/body/add", "nvjet_sm90_tss": ""}


def test_the_engine_names_its_phases_in_the_compiled_loop():
    """The speculative loop's compiled HLO carries the draft/verify/accept/commit scopes that
    a profile's phase split reads."""
    target = random_target(ModelConfig.from_hf_dict(TINY))
    drafter = parallelspec.build(parallelspec.ParallelSpecConfig(target.config, num_masks=2),
                                 target.module)
    tokens = jnp.ones((1, 8), jnp.int32)
    compiled = speculative._generate.lower(
        target.module, target.params, drafter,
        parallelspec.init_params(drafter, jax.random.PRNGKey(0)), tokens, jnp.array([8]),
        jax.random.PRNGKey(0), tree=Tree.chain(2), max_new_tokens=4, sampling=GREEDY,
        eos_ids=(), cache_length=32, cache_dtype=jnp.float32).compile()
    phases = set(limits.hlo_phases(compiled.as_text()).values())
    assert {"draft", "verify", "accept", "commit", "outside"} <= phases, phases


def test_the_train_step_names_its_phases(tmp_path):
    """The trainer's compiled step carries the scopes (trainer.PHASES) that
    experiments/bench_train.py splits a profile by, forward and backward."""
    target = random_target(ModelConfig.from_hf_dict(TINY))
    config = trainer_lib.TrainConfig(workdir=str(tmp_path), batch_size=2, max_length=16,
                                     total_steps=1, loss=trainer_lib.LossConfig(num_anchors=4),
                                     num_devices=1)
    trainer = trainer_lib.Trainer(config, target, parallelspec.ParallelSpecConfig(
        target.config, num_masks=2), "tiny")
    batch = {"tokens": jnp.ones((2, 16), jnp.int32), "lengths": jnp.array([16, 12]),
             "prompt_lengths": jnp.array([4, 4])}
    hlo = trainer._step.lower(trainer.state, trainer.target_params, batch,
                              jax.random.PRNGKey(0)).compile().as_text()
    phases = set(limits.scope_phases(hlo, trainer_lib.PHASES).values())
    assert {"target", "drafter", "loss", "optimizer", "backward/drafter",
            "backward/loss"} <= phases, phases
    typo = dataclasses.replace(config, attention="cudnn_flash")
    with pytest.raises(ValueError, match="attention must be one of"):
        trainer_lib.Trainer(typo, target, trainer.drafter.config, "tiny")


def test_bench_train_runs(tmp_path):
    """experiments/bench_train.py at SmolLM2 shapes, a small batch, two variants, a drafter
    reading three target layers (on one CPU device: the 8 fake ones of the other tests only
    slow it down)."""
    out = tmp_path / "train.json"
    run_experiment("bench_train.py", "--shape", "smollm2-135m", "--batch_size", "2",
                   "--max_length", "32", "--prompt_length", "8", "--num_anchors", "4",
                   "--num_masks", "1,2", "--steps", "1", "--repeats", "1",
                   "--feature_layers", "2,15,30", "--out", str(out),
                   env={"XLA_FLAGS": ""}, check=True)
    result = json.loads(out.read_text())
    assert {"card", "date", "jax"} <= set(result)  # timing.run_header: the results file's card
    assert result["feature_layers"] == [2, 15, 30]
    assert [r["num_masks"] for r in result["rows"]] == [1, 2]
    assert all(r["steps_per_s"] > 0 and r["model_tflops_per_step"] > 0
               for r in result["rows"])


def test_bench_grid_runs(tmp_path):
    """experiments/bench_grid.py on SmolLM2 with the committed drafter, 2 x 2 cells."""
    out = tmp_path / "grid.json"
    run_experiment("bench_grid.py", "--target", "smollm2-135m-instruct", "--drafter",
                   os.path.join(REPO, "assets", "drafters", "smollm2-135m-instruct-parallelspec"),
                   "--batch_sizes", "1,2", "--temperatures", "0,1", "--max_new_tokens", "4",
                   "--dtype", "float32", "--methods", "ar,parallelspec,parallelspec_lookup",
                   "--ps_lookup_tree", "2,1", "--out", str(out), check=True)
    result = json.loads(out.read_text())
    assert {"card", "date", "jax"} <= set(result)
    assert result["matmul_attention"] == "chunked"  # the default, "fastest", on a CPU
    cells = result["cells"]
    assert set(cells) == {"0/1", "0/2", "1/1", "1/2"}
    assert cells["0/2"]["ar"]["speedup"] == 1.0
    for method in ("parallelspec", "parallelspec_lookup"):  # float32: lossless
        assert cells["0/2"][method]["rows_differing"] == 0


def test_bench_decode_runs(tmp_path):
    """experiments/bench_decode.py on SmolLM2, psjax's autoregressive loop with its default
    step (one row on the CPU) and 3-row steps (psjax_ar_rowsN), each row recording its step;
    a method it does not know is named before the model loads."""
    bad = run_experiment("bench_decode.py", "--methods", "psjax_ar,ar_rows3",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "['ar_rows3']" in bad.stderr and "psjax_ar_rowsN" in bad.stderr
    out = tmp_path / "bench.json"
    run_experiment("bench_decode.py", "--dtype", "float32", "--num_prompts", "2",
                   "--max_new_tokens", "4", "--batch_sizes", "1", "--repeats", "1",
                   "--bandwidth_tbps", "1", "--methods", "psjax_ar,psjax_ar_rows3",
                   "--out", str(out), check=True)
    rows = json.loads(out.read_text())["results"]
    assert [(r["method"], r["status"]) for r in rows] == [("psjax_ar", "ok"),
                                                          ("psjax_ar_rows3", "ok")]
    assert [r["step_rows"] for r in rows] == [1, 3] and all(r["tokens_per_s"] > 0 for r in rows)


def test_exactness_probe_layouts_compute_the_same():
    """psjax.bench.exactness: in float32 the verify passes, as a chain and as a tree with decoy
    siblings moved out of the path, give the one-token steps' logits up to rounding (a wrong
    tree mask or move would not)."""
    slots, depth, mask = exactness.tree_layout(3)
    assert slots.tolist() == [0, 2, 4] and depth.tolist() == [0, 1, 1, 2, 2]
    assert mask[4].tolist() == [True, False, True, False, True]  # path node 2: path 0, 1
    assert mask[3].tolist() == [True, False, True, True, False]  # its decoy sibling
    target = random_target(ModelConfig.from_hf_dict(TINY), seed=3, scale=8.0)
    prompt = [5, 17, 5, 17, 40, 2, 9, 71, 33, 5]
    out = exactness.compare(target.module, target.params, prompt, new_tokens=10, t=4)
    assert out["positions"] == 8  # two whole passes of 4
    for layout in exactness.LAYOUTS:
        assert out[layout]["argmax_equal"] == 8
        assert out[layout]["max_abs_diff"] < 1e-4, (layout, out[layout])
    with pytest.raises(ValueError, match="no whole verify pass"):
        exactness.compare(target.module, target.params, prompt, new_tokens=3, t=4)


def test_exactness_probe_wide_steps_are_bitwise_on_the_cpu():
    """In bfloat16 one-row steps round apart from verify passes of t rows; steps run as t-row
    passes (`step_rows`, the shapes of the verify pass) give the chain's logits bit for bit on
    XLA's CPU backend (autoregressive.generate(step_rows=...) rests on this)."""
    target = random_target(ModelConfig.from_hf_dict(TINY), seed=3, scale=8.0, dtype="bfloat16")
    prompt = [5, 17, 5, 17, 40, 2, 9, 71, 33, 5]
    one_row = exactness.compare(target.module, target.params, prompt, new_tokens=8, t=4,
                                layouts=("chain",))
    wide = exactness.compare(target.module, target.params, prompt, new_tokens=8, t=4,
                             layouts=("chain",), step_rows=4)
    assert one_row["chain"]["bitwise_equal"] < 8  # the teeth: one row rounds apart
    assert wide["step_rows"] == 4 and wide["chain"]["bitwise_equal"] == 8
    assert wide["chain"]["bitwise_equal_by_index"] == [2, 2, 2, 2]  # two passes of 4
    with pytest.raises(ValueError, match="step_rows=0"):
        exactness.compare(target.module, target.params, prompt, new_tokens=8, t=4, step_rows=0)


def test_probe_exactness_cli(tmp_path):
    """experiments/probe_exactness.py on SmolLM2's shape with random weights, two settings; a
    knob it does not know is named before anything compiles."""
    bad = run_experiment("probe_exactness.py", "--configs", "default;gemm_rows=2",
                         capture_output=True, text=True)
    assert bad.returncode != 0 and "gemm_rows" in bad.stderr and "gemm_min_rows" in bad.stderr
    out = tmp_path / "exactness.json"
    run_experiment("probe_exactness.py", "--shape", "smollm2-135m", "--dtype", "float32",
                   "--prompt_tokens", "16", "--new_tokens", "4", "--t", "2",
                   "--configs", "default;gemm_min_rows=2,gemm_pad_min_weights=0",
                   "--out", str(out), check=True)
    result = json.loads(out.read_text())
    assert {"card", "date", "jax"} <= set(result)
    rows = result["configs"]
    assert rows["gemm_min_rows=2,gemm_pad_min_weights=0"]["numerics"]["gemm_min_rows"] == 2
    assert rows["default"]["numerics"]["gemm_min_rows"] == 1  # the CPU's default
    for row in rows.values():
        assert row["positions"] == 4 and row["chain"]["argmax_equal"] == 4
