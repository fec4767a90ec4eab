"""ParallelSpec: training and drafting see the same thing; drafting is lossless; training learns,
resumes exactly, and shards without changing the result."""

import os
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tiny_models
from psjax.convert import drafter_hf, hf
from psjax.decoding import autoregressive, common, speculative
from psjax.decoding.tree import Tree
from psjax.drafters import parallelspec as ps
from psjax.drafters.base import Accepted, Context, Prompt
from psjax.models.kv_cache import KVCache
from psjax.models import llama
from psjax.models.llama import Transformer

sys.path.insert(0, "experiments")
from configs import parallelspec as configs  # noqa: E402
from psjax.training import checkpoint, data, experiment, trainer as trainer_lib  # noqa: E402


@pytest.fixture(scope="module")
def tiny_target():
    _, path = tiny_models.make("llama_gqa_untied", vocab_size=64)
    config, params = hf.load_hf_dir(path)
    return Transformer(config), params


# (input mode, feature_layers): token; feature (the last hidden state); feature from layer 1's
# output and the last (the tiny target has 2 layers).
MODES = [("token", ()), ("feature", ()), ("feature", (1, 2))]


@pytest.mark.parametrize("mode,layers,attention", [m + ("einsum",) for m in MODES]
                         + [MODES[-1] + ("xla",)])
def test_training_mode_equals_drafting_mode(tiny_target, mode, layers, attention):
    """Draft after a prefill, accept 2 drafts + a bonus token, draft again: at both steps the
    draft logits (root, MASK_1..MASK_k) equal the training-mode logits of the group at the same
    anchor. With "xla" (passes without a cache through jax.nn.dot_product_attention, as cuDNN
    on a GPU) the drafter's prompt pass is causal without a mask tensor."""
    module, params = tiny_target
    drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=4, input_mode=mode,
                                             feature_layers=layers),
                       module.clone(uncached_attention=attention))
    dparams = ps.init_params(drafter, jax.random.PRNGKey(3))
    seq = np.random.RandomState(0).randint(0, 64, (1, 30)).astype(np.int32)
    module = module.clone(feature_layers=layers)
    full = module.apply({"params": params}, jnp.asarray(seq), jnp.arange(30)[None])
    assert full.features.shape[-1] == drafter.config.feature_size
    training = drafter.training_logits(dparams, params, jnp.asarray(seq), full.features,
                                       jnp.array([[19, 5, 22]]), jnp.array([30]))  # [1, 3, k, V]

    prompt_tokens, lengths = common.pad_prompts([seq[0, :19].tolist()])
    cache = KVCache.create(module.config, 1, 64, jnp.float32)
    _, prompt_hidden, _ = common.prefill(module, params, jnp.asarray(prompt_tokens),
                                         jnp.asarray(lengths), cache)
    sequence = jnp.zeros((1, 64), jnp.int32).at[0, :30].set(seq[0])
    context = Context(sequence, jnp.array([20]), params)  # root: position 19
    state = drafter.init_state(dparams, Prompt(jnp.asarray(prompt_tokens), jnp.asarray(lengths),
                                               prompt_hidden), context, 64)
    first, state = drafter.draft_logits(dparams, state, context)
    np.testing.assert_allclose(first[0], training[0, 0], atol=1e-5)
    # Verification kept the root (19) and drafts at 20, 21; the bonus token sits at 22.
    path_features = full.features[:, 19:24]
    state = drafter.commit(dparams, state, Accepted(jnp.array([3]), path_features,
                                                    jnp.array([23])))
    second, _ = drafter.draft_logits(dparams, state, context.replace(seq_len=jnp.array([23])))
    np.testing.assert_allclose(second[0], training[0, 2], atol=1e-5)
    # A real position's own output is the first draft it gives as an anchor (the trainer's
    # dense first-draft loss reads every position's).
    groups, every = drafter.training_hidden(dparams, params, jnp.asarray(seq), full.features,
                                            jnp.array([[19, 5, 22]]), jnp.array([30]))
    np.testing.assert_allclose(every[0, jnp.array([19, 5, 22])], groups[0, :, 0], atol=1e-6)


def test_training_pass_attention_implementation_computes_the_same(tiny_target, monkeypatch):
    """The trainer's drafter attends through jax.nn.dot_product_attention with the group-wise
    mask (cuDNN's on a GPU, as the target's pass: Transformer.uncached_attention; XLA's here):
    the same training logits as the einsum form that the consistency test above checks."""
    # A pass this small would take attend's few-query form whatever the implementation; a
    # training batch on a GPU (16 x 704 tokens) never does.
    monkeypatch.setattr(llama, "MULTIPLY_SUM_PAIRS", 0)
    module, params = tiny_target
    seq = jnp.asarray(np.random.RandomState(2).randint(0, 64, (2, 30)), jnp.int32)
    full = module.apply({"params": params}, seq, jnp.broadcast_to(jnp.arange(30), (2, 30)))
    anchors, lengths = jnp.array([[19, 5, 22], [3, 11, 25]]), jnp.array([30, 26])
    logits = []
    for attention in ("einsum", "xla"):
        drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=4),
                           module.clone(uncached_attention=attention))
        dparams = ps.init_params(drafter, jax.random.PRNGKey(3))
        logits.append(drafter.training_logits(dparams, params, seq, full.features, anchors,
                                              lengths))
    np.testing.assert_allclose(logits[1], logits[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode,layers", MODES)
def test_random_drafter_is_lossless(tiny_target, mode, layers):
    module, params = tiny_target
    drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=4, input_mode=mode,
                                             feature_layers=layers), module)
    dparams = ps.init_params(drafter, jax.random.PRNGKey(1))
    rs = np.random.RandomState(0)
    prompts = [rs.randint(0, 64, n).tolist() for n in (5, 17, 9, 30)]
    ref = autoregressive.generate(module, params, prompts, max_new_tokens=30, eos_ids=(7,))
    for tree in (Tree.chain(5), Tree.chain(2), Tree.from_branching((2, 2, 1))):
        out = speculative.generate(module, params, prompts, drafter=drafter,
                                   drafter_params=dparams, tree=tree, max_new_tokens=30,
                                   eos_ids=(7,))
        assert out.sequences() == ref.sequences()


def test_bad_feature_layers_are_refused(tiny_target):
    module, _ = tiny_target
    for layers, message in (((0, 2), "in 1..2"), ((2, 1), "increasing"), ((3,), "in 1..2")):
        with pytest.raises(ValueError, match=message):
            ps.ParallelSpecConfig(module.config, feature_layers=layers)
    with pytest.raises(ValueError, match="needs input_mode='feature'"):
        ps.ParallelSpecConfig(module.config, input_mode="token", feature_layers=(1, 2))


def test_deeper_tree_than_masks_is_refused(tiny_target):
    module, params = tiny_target
    drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=2), module)
    with pytest.raises(ValueError, match="at most 3 positions"):
        speculative.generate(module, params, [[1, 2]], drafter=drafter,
                             drafter_params=ps.init_params(drafter, jax.random.PRNGKey(0)),
                             tree=4, max_new_tokens=4)


def _tiny_config(**overrides):
    config = configs.get_config("tiny")
    config.eval_every = 0
    for key, value in overrides.items():
        config[key] = value
    return config


def test_tiny_training_loss_falls(tmp_path):
    _, history = experiment.train(_tiny_config(), str(tmp_path))
    losses = [m["loss"] for m in history]
    assert losses[-1] < 0.85 * losses[0], losses


def test_multi_layer_features_train_and_export(tmp_path):
    """A drafter reading several target layers trains through the whole experiment and its
    workdir restores with the layers in its config (what export_hf.py writes out)."""
    config = _tiny_config()
    config.drafter.feature_layers = (1, 2)
    _, history = experiment.train(config, str(tmp_path))
    losses = [m["loss"] for m in history]
    assert losses[-1] < 0.85 * losses[0], losses
    params, config_dict, _ = checkpoint.restore_params(str(tmp_path))
    restored = drafter_hf.config_from_dict(config_dict)
    assert restored.feature_layers == (1, 2)
    assert params["fc"]["kernel"].shape == (3 * restored.target.hidden_size,
                                            restored.target.hidden_size)


def test_nonfinite_steps_are_skipped():
    tx = trainer_lib.make_optimizer(1e-2, total_steps=10, warmup_steps=0)
    params = {"w": jnp.ones((3,))}
    state = tx.init(params)
    nan = {"w": jnp.array([1.0, jnp.nan, 1.0])}
    updates, state = tx.update(nan, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)  # parameters and moments left alone
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (1, 1)
    updates, state = tx.update({"w": jnp.ones((3,))}, state, params)
    assert np.all(np.asarray(updates["w"]) < 0)  # the next finite step trains
    assert (int(state.notfinite_count), int(state.total_notfinite)) == (0, 1)


def test_training_that_stays_nonfinite_stops_with_finite_parameters(tmp_path, monkeypatch):
    loss_fn = trainer_lib.loss_fn
    monkeypatch.setattr(trainer_lib, "loss_fn", lambda *a, **k: jax.tree.map(
        lambda x: x * jnp.nan, loss_fn(*a, **k)))
    config = _tiny_config(max_nonfinite_steps=5)  # tiny logs every 5 steps
    with pytest.raises(FloatingPointError, match="not finite for the last 5 steps"):
        experiment.train(config, str(tmp_path))
    params, config_dict, _ = checkpoint.restore_params(str(tmp_path))
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))
    drafter_config = drafter_hf.config_from_dict(config_dict)
    with pytest.raises(ValueError, match="not finite: its training diverged"):
        drafter_hf.save_drafter(str(tmp_path / "export"), drafter_config,
                                jax.tree.map(lambda x: x * np.nan, params), "tiny")


def test_dense_first_draft_loss_trains(tmp_path):
    config = _tiny_config()
    config.loss.dense_weight = 1.0
    _, history = experiment.train(config, str(tmp_path))
    losses = [m["loss"] for m in history]
    assert losses[-1] < 0.85 * losses[0], losses
    assert 0.0 <= history[-1]["dense_top1"] <= 1.0 and history[-1]["dense_kl"] > 0


def test_depth_decay_weighs_the_drafts(tiny_target):
    """depth_decay 1 averages every draft alike; 0 trains the first draft alone: the loss is then
    the first draft's soft + hard terms."""
    module, params = tiny_target
    drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=3), module)
    dparams = ps.init_params(drafter, jax.random.PRNGKey(0))
    tokens = np.random.RandomState(1).randint(0, 64, (2, 24)).astype(np.int32)
    batch = {"tokens": jnp.asarray(tokens), "lengths": jnp.array([24, 20]),
             "prompt_lengths": jnp.array([4, 6])}
    losses = {}
    for decay in (1.0, 0.0):
        config = trainer_lib.LossConfig(soft_weight=1.0, hard_weight=0.5, num_anchors=8,
                                        depth_decay=decay)
        losses[decay] = trainer_lib.loss_fn(dparams, params, batch, jax.random.PRNGKey(2),
                                            drafter=drafter, loss=config)
    (all_drafts, metrics), (first_only, _) = losses[1.0], losses[0.0]
    per_draft = np.asarray(metrics["kl"]) + 0.5 * np.asarray(metrics["ce"])
    np.testing.assert_allclose(first_only, per_draft[0], rtol=1e-5)
    assert not np.isclose(all_drafts, first_only)


@pytest.mark.parametrize("variant", ["llama_gqa_untied", "qwen2_mha_tied"])
def test_trainer_head_equals_the_targets_head(variant):
    """The trainer's head (its own backward, for bfloat16 GEMMs) gives the target head's logits
    and, in float32, autodiff's input gradient."""
    _, path = tiny_models.make(variant, vocab_size=64)
    config, params = hf.load_hf_dir(path)
    module = Transformer(config)
    hidden = jnp.asarray(np.random.RandomState(3).randn(2, 5, config.hidden_size), jnp.float32)
    kernel = trainer_lib._head_kernel(module, params)
    ours = lambda h: trainer_lib._head_logits(h, kernel)
    reference = lambda h: ps.target_logits(module, params, h)
    np.testing.assert_allclose(ours(hidden), reference(hidden), rtol=1e-6, atol=1e-6)
    grad = lambda head: jax.grad(lambda h: jnp.sum(jnp.sin(head(h))))(hidden)
    np.testing.assert_allclose(grad(ours), grad(reference), rtol=1e-5, atol=1e-6)


def test_bfloat16_train_step_has_no_float32_products(tiny_target):
    """In a bfloat16 step every matmul of the gradient (the drafter layer's backward, the head's)
    multiplies bfloat16 arrays: a float32 x float32 product is a TF32 GEMM on a GPU. The
    drafter's projections return float32, so autodiff made 14 of them (llama.matmul)."""
    module, params = tiny_target
    target = Transformer(module.config, dtype=jnp.bfloat16)
    params = jax.tree.map(lambda p: p.astype(jnp.bfloat16), params)
    drafter = ps.build(ps.ParallelSpecConfig(module.config, num_masks=3), target,
                       dtype=jnp.bfloat16, param_dtype=jnp.float32)
    dparams = ps.init_params(drafter, jax.random.PRNGKey(0))
    batch = {"tokens": jnp.zeros((2, 24), jnp.int32), "lengths": jnp.array([24, 20]),
             "prompt_lengths": jnp.array([4, 6])}
    loss = trainer_lib.LossConfig(num_anchors=8)
    grad = jax.jit(jax.grad(lambda p: trainer_lib.loss_fn(
        p, params, batch, jax.random.PRNGKey(2), drafter=drafter, loss=loss)[0]))
    operands = re.findall(r"stablehlo.dot_general.*?: \((tensor<[^>]*>), (tensor<[^>]*>)\)",
                          grad.lower(dparams).as_text())
    assert len(operands) > 14
    assert [o for o in operands if all(t.endswith("xf32>") for t in o)] == []


def test_distillation_loss_equals_its_definition():
    """The trainer's loss (fewer memory passes, its own backward) gives what log-softmaxes and
    autodiff give: soft_weight x KL(p || q) + hard_weight x CE, its metrics, q's gradient."""
    rs = np.random.RandomState(4)
    p, q = (jnp.asarray(4 * rs.randn(3, 5, 97), jnp.float32) for _ in range(2))
    labels = jnp.asarray(rs.randint(0, 97, (3, 5)))
    weights = jnp.asarray(rs.rand(3, 5), jnp.float32)

    def definition(p, q, labels, soft_weight, hard_weight):
        log_p, log_q = jax.nn.log_softmax(p), jax.nn.log_softmax(q)
        kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
        ce = -jnp.take_along_axis(log_q, labels[..., None], axis=-1)[..., 0]
        agree = (jnp.argmax(q, -1) == jnp.argmax(p, -1)).astype(jnp.float32)
        return soft_weight * kl + hard_weight * ce, kl, ce, agree

    for soft, hard in ((1.0, 0.1), (0.0, 1.0)):
        ours = trainer_lib._distill(p, q, labels, soft, hard)
        for a, b in zip(ours, definition(p, q, labels, soft, hard)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
        grad = lambda f: jax.grad(lambda q: jnp.sum(weights * f(p, q, labels, soft, hard)[0]))(q)
        np.testing.assert_allclose(grad(trainer_lib._distill), grad(definition), rtol=1e-5,
                                   atol=1e-6)


def test_collate_crops_the_prompt_before_the_answer():
    seq = lambda p, a: {"tokens": np.arange(p + a), "prompt_length": p}
    batch = data.collate([seq(3, 4), seq(10, 3), seq(10, 20), seq(2, 20)], max_length=8)
    # Short: untouched. Long prompt: its front goes, the whole answer stays. Long prompt and
    # answer: the prompt's last 8 // 4 = 2 tokens stay, the answer's end goes. Short prompt,
    # long answer: the answer's end goes.
    np.testing.assert_array_equal(batch["tokens"][:, 0], [0, 5, 8, 0])
    np.testing.assert_array_equal(batch["lengths"], [7, 8, 8, 8])
    np.testing.assert_array_equal(batch["prompt_lengths"], [3, 5, 2, 2])
    np.testing.assert_array_equal(batch["tokens"][1], np.arange(5, 13))


def test_holdout_is_never_trained_on_and_measured(tmp_path):
    # Two sets one after the other (data.jsonl_dir A,B): the held-out sample is drawn from both.
    source = [{"tokens": np.arange(i, i + 6), "prompt_length": 2} for i in range(21)]
    train, held = data.split_holdout(source, 9, batch_size=4, max_length=8)
    assert len(train) == 13 and len(held) == 2  # 9 rounded down to two batches of 4
    trained = [int(train[i]["tokens"][0]) for i in range(len(train))]
    held_out = np.concatenate([b["tokens"][:, 0] for b in held]).tolist()
    assert sorted(trained + held_out) == list(range(21))
    assert min(held_out) < 10 <= max(held_out)
    again = data.split_holdout(source, 9, batch_size=4, max_length=8)  # seeded: resumes alike
    assert [int(again[0][i]["tokens"][0]) for i in range(13)] == trained
    assert data.split_holdout(source, 0, batch_size=4, max_length=8)[1] == []

    config = _tiny_config(eval_every=20)  # = total_steps: one evaluation, at the end
    trainer, history = experiment.train(config, str(tmp_path))
    last = history[-1]
    depth = trainer.drafter.config.draft_length
    assert len(last["holdout_top1"]) == depth and np.isfinite(last["holdout_loss"])
    assert 1.0 <= last["holdout_tau_estimate"] <= 1.0 + depth and "eval_tau" in last
    assert "holdout_loss" not in history[0]


def test_resume_gives_the_same_curve(tmp_path):
    full = [m["loss"] for m in experiment.train(_tiny_config(), str(tmp_path / "a"))[1]]

    class Killed(Exception):
        pass

    def kill(step, metrics):
        if step == 15:  # after the step-10 checkpoint
            raise Killed

    with pytest.raises(Killed):
        experiment.train(_tiny_config(), str(tmp_path / "b"), on_metrics=kill)
    resumed = experiment.train(_tiny_config(), str(tmp_path / "b"))[1]
    assert [m["step"] for m in resumed] == [15, 20]
    np.testing.assert_allclose([m["loss"] for m in resumed], full[2:], rtol=1e-5)


def test_sharded_training_equals_one_device(tmp_path):
    assert jax.device_count() == 8
    one = experiment.train(_tiny_config(num_devices=1, mesh=(1, 1, 1)), str(tmp_path / "one"))[1]
    eight = experiment.train(_tiny_config(mesh=(2, 2, 2)), str(tmp_path / "eight"))[1]
    np.testing.assert_allclose([m["loss"] for m in eight], [m["loss"] for m in one], rtol=2e-4)


def test_init_from_an_exported_drafter(tmp_path):
    """A new run starts from an exported drafter's weights (fine-tuning on new data), and
    refuses one of another shape with the flags that fix it."""
    experiment.train(_tiny_config(), str(tmp_path / "a"))
    params, config_dict, target_name = checkpoint.restore_params(str(tmp_path / "a"))
    exported = str(tmp_path / "drafter")
    drafter_hf.save_drafter(exported, drafter_hf.config_from_dict(config_dict), params,
                            target_name)
    trainer, history = experiment.train(_tiny_config(total_steps=0, init_from=exported),
                                        str(tmp_path / "b"))
    assert history == []
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(trainer.state.params), params)

    from_workdir, _ = experiment.train(_tiny_config(total_steps=0, init_from=str(tmp_path / "a")),
                                       str(tmp_path / "d"))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(from_workdir.state.params),
                 params)

    config = _tiny_config(total_steps=0, init_from=exported)
    config.drafter.num_masks += 1
    with pytest.raises(ValueError, match="num_masks"):
        experiment.train(config, str(tmp_path / "c"))
    typo = str(tmp_path / "no_such_run")
    with pytest.raises(FileNotFoundError, match="neither an exported drafter"):
        experiment.train(_tiny_config(total_steps=0, init_from=typo), str(tmp_path / "e"))
    assert not os.path.exists(typo)  # nothing created on the way
