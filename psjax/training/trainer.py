"""Distils a ParallelSpec drafter from its frozen target: one jitted, sharded, donated train step.

The step runs the target once under `stop_gradient` (hidden states of the whole sequence), then
the drafter once over the sequence plus a group of k masks after each sampled anchor (group-wise
parallel training), and differentiates the drafter only. MASK_m of the group at anchor t learns
the target's distribution for the token at t + m (soft labels, KL) and/or that token (hard
labels). Metrics are kept per draft position: top-1 agreement with the target predicts
acceptance.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tensorboardX
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from psjax import sharding
from psjax.convert import drafter_hf
from psjax.drafters import parallelspec
from psjax.models import llama
from psjax.models.llama import Transformer
from psjax.models.target import Target
from psjax.training import checkpoint, data


# The named scopes loss_fn and the step mark their phases with: a profile's split
# (experiments/bench_train.py, bench.limits.scope_phases).
PHASES = ("target", "drafter", "heads", "loss", "optimizer")
TRAIN_ATTENTION = ("auto", "einsum", "xla", "cudnn")


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any
    opt_state: Any


@dataclasses.dataclass(frozen=True)
class LossConfig:
    soft_weight: float = 1.0  # KL(target || drafter) at each mask
    hard_weight: float = 0.0  # cross-entropy on the token the target actually produced
    num_anchors: int = 64  # groups per sequence; >= max_length means every position
    # The first draft (a real position's own output) trained at every answer position, not only
    # at the sampled anchors, as EAGLE trains its drafter: this weight times its soft and hard
    # terms, averaged over positions, is added to the loss.
    dense_weight: float = 0.0
    # Draft d (0 = the first) weighs depth_decay ** d in the loss (Medusa weighs its heads
    # 0.8 ** d); 1.0 weighs all drafts alike. With k + 1 drafts averaged alike, the first two
    # carry 2 / (k + 1) of the loss, and drafters with fewer masks drafted them better; 0.8
    # closed most of that gap, and the training config uses it (docs/parallelspec.md, "k
    # trained apart").
    depth_decay: float = 1.0


def make_optimizer(learning_rate: float, total_steps: int, warmup_steps: int,
                   weight_decay: float = 0.0, clip_norm: float = 1.0, grad_accum: int = 1,
                   b1: float = 0.9, b2: float = 0.95) -> optax.GradientTransformation:
    updates = max(1, total_steps // grad_accum)
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, learning_rate, min(warmup_steps, updates - 1) if updates > 1 else 0, updates,
        end_value=0.1 * learning_rate)
    tx = optax.chain(optax.clip_by_global_norm(clip_norm),
                     optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    if grad_accum > 1:
        tx = optax.MultiSteps(tx, every_k_schedule=grad_accum)
    # A step whose gradients are not finite leaves parameters and moments alone (counted in
    # the state's notfinite_count and total_notfinite): one NaN made every later step NaN in
    # four GPU runs on 2026-11-30. It never gives up by itself; Trainer.train stops a run
    # that stays non-finite (TrainConfig.max_nonfinite_steps).
    return optax.apply_if_finite(tx, max_consecutive_errors=2**30)


def anchor_positions(lengths, prompt_lengths, max_length: int):
    """[B, L] where a group may be anchored: a real token from the last prompt token on, with at
    least one real token after it (what drafting sees)."""
    pos = jnp.arange(max_length)
    return (pos[None] >= prompt_lengths[:, None] - 1) & (pos[None] <= lengths[:, None] - 2)


def sample_anchors(rng, lengths, prompt_lengths, max_length: int, num_anchors: int):
    """[B, G] anchor positions (`anchor_positions`) and their validity."""
    b = lengths.shape[0]
    pos = jnp.arange(max_length)
    valid = anchor_positions(lengths, prompt_lengths, max_length)
    if num_anchors >= max_length:
        return jnp.broadcast_to(pos, (b, max_length)), valid
    scores = jnp.where(valid, jax.random.uniform(rng, (b, max_length)), -1.0)
    _, anchors = jax.lax.top_k(scores, num_anchors)
    return anchors.astype(jnp.int32), jnp.take_along_axis(valid, anchors, axis=1)


def _head_kernel(target: Transformer, target_params) -> jax.Array:
    """The target's LM head as a [D, V] matrix (tied: the embedding table, transposed)."""
    if target.config.tie_word_embeddings:
        return target_params["embed_tokens"]["embedding"].T
    return target_params["lm_head"]["kernel"]


def _head_logits(hidden, kernel):
    """Logits through the target's frozen head (`_head_kernel`), for both models in the loss:
    float32 products as `Transformer.logits` computes them (same values), with the input
    gradient (the drafter's) computed in `hidden`'s dtype (`llama.matmul`). Left to autodiff,
    the float32 cotangent promoted that [N, V] x [V, D] product to a float32 (TF32) GEMM: 3-13
    ms of a 60-120 ms step on an H100; in bfloat16, about 2 ms less at k = 3
    (experiments/bench_train.py). The head is frozen: its kernel gradient is never used."""
    return llama.matmul(hidden, kernel.astype(hidden.dtype), jnp.float32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _distill(p_logits, q_logits, labels, soft_weight: float, hard_weight: float):
    """Per-prediction loss (soft_weight x KL(p || q) + hard_weight x cross-entropy of q on
    `labels`), KL, cross-entropy and top-1 agreement; float32 logits [..., V], labels [...].

    Written for memory passes, which set its time: a k = 3 step's logits are 4,096 x 151,936
    float32 per model, 2.5 GB each (Qwen2.5-0.5B, batch 16, 64 anchors). The forward reads each
    array twice (its argmax, which gives the max; then the sums of exponentials) and writes no
    log-softmax: KL = sum_v e^(p_v - m_p) (p_v - q_v) / Z_p - lse_p + lse_q. The backward
    makes the logits' gradient in one pass from the saved log-normalisers. Written with
    log-softmaxes and left to autodiff, the loss took ~10 passes: the step went from 35.7 to
    32.5 ms on an H200 (results/train_h200/fused_loss/). Gradients flow from the loss alone
    (KL, cross-entropy and agreement are metrics) into q_logits alone (p is the frozen
    target's)."""
    return _distill_fwd(p_logits, q_logits, labels, soft_weight, hard_weight)[0]


def _distill_fwd(p_logits, q_logits, labels, soft_weight, hard_weight):
    def top(logits):  # (argmax, max): one reduction
        index = jnp.argmax(logits, axis=-1)
        return index, jnp.take_along_axis(logits, index[..., None], axis=-1)

    (p_top, p_max), (q_top, q_max) = top(p_logits), top(q_logits)
    p_exp = jnp.exp(p_logits - p_max)
    p_sum = jnp.sum(p_exp, axis=-1)
    lse_p = p_max[..., 0] + jnp.log(p_sum)
    lse_q = q_max[..., 0] + jnp.log(jnp.sum(jnp.exp(q_logits - q_max), axis=-1))
    kl = jnp.sum(p_exp * (p_logits - q_logits), axis=-1) / p_sum - lse_p + lse_q
    ce = lse_q - jnp.take_along_axis(q_logits, labels[..., None], axis=-1)[..., 0]
    agree = (q_top == p_top).astype(jnp.float32)
    out = (soft_weight * kl + hard_weight * ce, kl, ce, agree)
    return out, (p_logits, q_logits, labels, lse_p, lse_q)


def _distill_bwd(soft_weight, hard_weight, residuals, cotangents):
    p_logits, q_logits, labels, lse_p, lse_q = residuals
    g = cotangents[0][..., None]  # the loss's; the metrics' are not followed
    q_prob = jnp.exp(q_logits - lse_q[..., None])
    p_prob = jnp.exp(p_logits - lse_p[..., None])
    label = jnp.arange(q_logits.shape[-1]) == labels[..., None]
    grad = g * (soft_weight * (q_prob - p_prob) + hard_weight * (q_prob - label))
    return None, grad, None


_distill.defvjp(_distill_fwd, _distill_bwd)


def loss_fn(params, target_params, batch, rng, *, drafter: parallelspec.ParallelSpec,
            loss: LossConfig):
    target: Transformer = drafter.target_module
    kernel = _head_kernel(target, target_params)
    head = lambda h: _head_logits(h, kernel)
    tokens, lengths = batch["tokens"], batch["lengths"]
    b, length = tokens.shape
    depth = drafter.config.draft_length
    positions = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
    with jax.named_scope("target"):  # PHASES
        out = jax.lax.stop_gradient(target.apply(
            {"params": target_params}, tokens, positions, compute_logits=False))
        hidden = out.hidden
    anchors, anchor_valid = sample_anchors(rng, lengths, batch["prompt_lengths"], length,
                                           loss.num_anchors)
    with jax.named_scope("drafter"):
        groups, every = drafter.training_hidden(params, target_params, tokens, out.features,
                                                anchors, lengths)
    with jax.named_scope("heads"):
        q_logits = head(groups)
    predicted = anchors[:, :, None] + jnp.arange(1, depth + 1)  # [B, G, k+1] positions drafted
    valid = anchor_valid[:, :, None] & (predicted <= lengths[:, None, None] - 1)
    index = jnp.clip(predicted, 0, length - 1).reshape(b, -1)
    # The target's distribution for the token at position p comes from position p - 1. The
    # dense term needs it at every position: then the groups' are gathered, not recomputed.
    with jax.named_scope("heads"):
        p_every = jax.lax.stop_gradient(head(hidden)) if loss.dense_weight else None
        if p_every is None:
            prev = jnp.take_along_axis(hidden, (index - 1)[:, :, None], axis=1)
            p_logits = jax.lax.stop_gradient(head(prev))
        else:
            p_logits = jnp.take_along_axis(p_every, (index - 1)[:, :, None], axis=1)
        p_logits = p_logits.reshape(q_logits.shape)
    labels = jnp.take_along_axis(tokens, index, axis=1).reshape(predicted.shape)
    with jax.named_scope("loss"):
        per_token, kl, ce, agree = _distill(p_logits, q_logits, labels, loss.soft_weight,
                                            loss.hard_weight)
    weight = valid.astype(jnp.float32)
    depth_weight = weight * loss.depth_decay ** jnp.arange(depth, dtype=jnp.float32)
    total = jnp.sum(per_token * depth_weight) / jnp.maximum(depth_weight.sum(), 1e-9)

    per_position = lambda x: jnp.sum(x * weight, axis=(0, 1)) / jnp.maximum(
        weight.sum(axis=(0, 1)), 1.0)
    top1 = per_position(agree)
    metrics = {"loss": total, "kl": per_position(kl), "ce": per_position(ce), "top1": top1,
               # Chain acceptance if positions agreed independently: 1 + sum_m prod_{j<=m}.
               "tau_estimate": 1.0 + jnp.sum(jnp.cumprod(top1)),
               "num_predictions": weight.sum()}
    if p_every is not None:
        # Position j as the anchor: its output drafts the token at j + 1, which the target's
        # output at j gives; at every position a group could be anchored.
        dense_valid = anchor_positions(lengths, batch["prompt_lengths"], length).astype(
            jnp.float32)
        next_tokens = jnp.concatenate([tokens[:, 1:], tokens[:, -1:]], axis=1)
        with jax.named_scope("heads"):
            q_every = head(every)
        with jax.named_scope("loss"):
            dense, dense_kl, _, dense_agree = _distill(p_every, q_every, next_tokens,
                                                       loss.soft_weight, loss.hard_weight)
        mean = lambda x: jnp.sum(x * dense_valid) / jnp.maximum(dense_valid.sum(), 1.0)
        total = total + loss.dense_weight * mean(dense)
        metrics.update(loss=total, dense_kl=mean(dense_kl), dense_top1=mean(dense_agree))
    return total, metrics


def step_flops(target_config, drafter_config, batch: int, length: int, num_anchors: int,
               dense: bool = False) -> float:
    """Model FLOPs of one train step: target forward, drafter forward and backward (backward =
    2x forward), the LM head on every mask (and with `dense`, every position) for both models
    (the drafter's head backward computes input gradients only). Attention counts the dense
    [T, T] scores the step computes."""
    c = target_config
    d, v = c.hidden_size, c.vocab_size
    q = c.num_attention_heads * c.head_dim
    kv = c.num_key_value_heads * c.head_dim
    layer = d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size
    groups = min(num_anchors, length)
    masks = batch * groups * drafter_config.draft_length  # drafted positions
    masks += batch * length if dense else 0
    t_drafter = length + groups * drafter_config.num_masks
    target_fwd = 2 * batch * length * c.num_hidden_layers * layer
    target_fwd += 4 * batch * length * length * q * c.num_hidden_layers  # QK^T and PV
    target_head = 2 * masks * d * v
    fc = (d + drafter_config.feature_size) * d if drafter_config.input_mode == "feature" else 0
    drafter_layer = layer + fc
    drafter = 6 * batch * t_drafter * drafter_layer + 3 * 4 * batch * t_drafter ** 2 * q
    drafter_head = 4 * masks * d * v
    return float(target_fwd + target_head + drafter + drafter_head)


@dataclasses.dataclass
class TrainConfig:
    """Everything the loop needs besides model and data (experiments/configs fill it)."""

    workdir: str
    batch_size: int
    max_length: int
    total_steps: int
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    grad_accum: int = 1
    loss: LossConfig = LossConfig()
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    async_checkpoint: bool = True
    init_from: str = ""  # a training workdir or an exported drafter directory (params only)
    mesh: tuple[int, int, int] = (1, -1, 1)  # data, fsdp, tensor
    num_devices: int = 0  # 0: all devices
    rules: Sequence = sharding.DEFAULT_RULES
    peak_tflops: float = 989.0  # bf16 dense peak of the card, for MFU
    eval_every: int = 0  # 0: no periodic tau evaluation
    # Stop with an error once this many steps in a row had non-finite gradients (each one is
    # skipped; checked at logging steps).
    max_nonfinite_steps: int = 20
    # How the training passes attend (the target's over whole sequences, the drafter's
    # group-wise pass: Transformer.uncached_attention), one of TRAIN_ATTENTION; "auto":
    # llama.fastest_uncached_attention (cuDNN flash attention on a GPU in bfloat16).
    attention: str = "auto"


class Trainer:
    def __init__(self, config: TrainConfig, target: Target, drafter_config:
                 parallelspec.ParallelSpecConfig, target_name: str, compute_dtype=jnp.bfloat16):
        self.config = config
        self.target = target
        self.target_name = target_name
        attention = config.attention
        if attention not in TRAIN_ATTENTION:
            raise ValueError(f"attention must be one of {TRAIN_ATTENTION}, got {attention!r}")
        if attention == "auto":
            attention = llama.fastest_uncached_attention(compute_dtype)
        # The drafter reads the target module for its pass in loss_fn (with the features it
        # reads; the MLP's hidden array in the compute dtype: Transformer.mlp_hidden_dtype),
        # embeddings and head, and attends as its passes without a cache do.
        self.drafter = parallelspec.build(
            drafter_config, target.module.clone(uncached_attention=attention,
                                                feature_layers=drafter_config.feature_layers,
                                                mlp_hidden_dtype=target.module.dtype),
            dtype=compute_dtype, param_dtype=jnp.float32)
        self.mesh = sharding.make_mesh(
            *config.mesh, devices=jax.devices()[:config.num_devices or None])
        self.tx = make_optimizer(config.learning_rate, config.total_steps, config.warmup_steps,
                                 config.weight_decay, config.clip_norm, config.grad_accum)
        self._place_target()
        self.state = self._init_state()
        self.batch_sharding = {k: sharding.data_sharding(self.mesh, n) for k, n in
                               (("tokens", 2), ("lengths", 1), ("prompt_lengths", 1))}
        self._step = jax.jit(
            self._train_step, donate_argnums=(0,),
            in_shardings=(self.state_sharding, self.target_sharding, self.batch_sharding, None),
            out_shardings=(self.state_sharding, None))
        self._metrics = jax.jit(
            lambda params, target_params, batch: loss_fn(
                params, target_params, batch, jax.random.PRNGKey(0), drafter=self.drafter,
                loss=self.config.loss)[1],
            in_shardings=(self.state_sharding.params, self.target_sharding, self.batch_sharding))

    # --- set-up ------------------------------------------------------------------------------

    def _place_target(self):
        module = self.target.module
        dummy = jnp.zeros((1, 4), jnp.int32)
        logical = sharding.logical_axes(
            lambda: module.init(jax.random.PRNGKey(0), dummy, dummy))["params"]
        self.target_sharding = sharding.shardings(logical, self.target.params, self.mesh,
                                                  self.config.rules)
        self.target_params = jax.device_put(self.target.params, self.target_sharding)

    def _init_state(self) -> TrainState:
        """Shapes first (eval_shape), then a sharded init: nothing is materialised whole."""
        init = lambda rng: parallelspec.init_params(self.drafter, rng, unbox=False)
        logical = nn.get_partition_spec(jax.eval_shape(init, jax.random.PRNGKey(0)))
        abstract = jax.eval_shape(lambda r: nn.meta.unbox(init(r)), jax.random.PRNGKey(0))
        param_sharding = sharding.shardings(logical, abstract, self.mesh, self.config.rules)
        params = jax.jit(lambda r: nn.meta.unbox(init(r)), out_shardings=param_sharding)(
            jax.random.PRNGKey(self.config.seed))
        opt_state = jax.jit(self.tx.init)(params)
        state = TrainState(jnp.zeros((), jnp.int32), params, opt_state)
        # Parameter-shaped state follows the params' shardings; scalars (step, counts) are
        # replicated over the mesh.
        replicated = NamedSharding(self.mesh, PartitionSpec())
        self.state_sharding = jax.tree.map(
            lambda x: x.sharding if isinstance(x.sharding, NamedSharding) else replicated, state)
        return jax.device_put(state, self.state_sharding)

    def _train_step(self, state: TrainState, target_params, batch, rng):
        rng = jax.random.fold_in(rng, state.step)
        grad_fn = jax.value_and_grad(
            lambda p: loss_fn(p, target_params, batch, rng, drafter=self.drafter,
                              loss=self.config.loss), has_aux=True)
        (_, metrics), grads = grad_fn(state.params)
        with jax.named_scope("optimizer"):
            updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
            metrics["grad_norm"] = optax.tree.norm(grads)
            metrics["skipped_steps"] = opt_state.total_notfinite
            metrics["nonfinite_in_a_row"] = opt_state.notfinite_count
            params = optax.apply_updates(state.params, updates)
        return TrainState(state.step + 1, params, opt_state), metrics

    def holdout_metrics(self, params, batches: Sequence[dict]) -> dict:
        """The training metrics on held-out batches (fixed anchors, no update), prefixed
        `holdout_`: next to the training batches' metrics they show overfitting."""
        sums, weight = None, 0.0
        with sharding.activate(self.mesh, self.config.rules):
            for batch in batches:
                m = jax.tree.map(np.asarray, self._metrics(params, self.target_params, batch))
                w = float(m.pop("num_predictions"))
                m.pop("tau_estimate")
                sums = jax.tree.map(lambda x: x * w, m) if sums is None else jax.tree.map(
                    lambda a, x: a + x * w, sums, m)
                weight += w
        if sums is None or weight == 0:
            return {}
        mean = jax.tree.map(lambda x: x / weight, sums)
        mean["tau_estimate"] = 1.0 + float(np.sum(np.cumprod(mean["top1"])))
        return {f"holdout_{k}": np.asarray(v).tolist() for k, v in mean.items()}

    # --- checkpoints -------------------------------------------------------------------------

    def _meta(self, position: int) -> dict:
        c = self.drafter.config
        return {"data_position": position, "target_name": self.target_name,
                "drafter": drafter_hf.config_to_dict(c)}

    def restore_or_init(self, ckpt: checkpoint.Checkpointer) -> int:
        """The run's own latest checkpoint, else `init_from` (params only), else scratch.
        Returns the data position to resume from."""
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), self.state)
        if ckpt.latest_step() is not None:
            self.state, meta = ckpt.restore(abstract)
            logging.info("resumed from %s step %d", ckpt.directory, int(self.state.step))
            return int(meta["data_position"])
        if self.config.init_from:
            self.state = self.state.replace(params=self._initial_params(abstract))
            logging.info("initialised drafter params from %s", self.config.init_from)
        return 0

    def _initial_params(self, abstract: TrainState):
        """`init_from`'s params on this run's shardings: an exported drafter directory
        (`export_hf.py`, config.json beside the weights) or another run's workdir."""
        path = self.config.init_from
        if not os.path.exists(os.path.join(path, "config.json")):
            missing = FileNotFoundError(
                f"init_from={path!r} holds neither an exported drafter (config.json) nor "
                "checkpoints: name a drafter directory or a training workdir")
            # Checked before opening a manager, which would create the directory it is given.
            if not os.path.isdir(os.path.join(path, "checkpoints")):
                raise missing
            other = checkpoint.Checkpointer(path, async_save=False)
            try:
                if other.latest_step() is None:
                    raise missing
                return other.restore(abstract)[0].params
            finally:
                other.close()
        exported, params = drafter_hf.load_drafter(path, self.target.module,
                                                   dtype=jnp.float32)
        ours, theirs = self.drafter.config, exported.config
        if theirs != ours:
            describe = lambda c: (f"k={c.num_masks} {c.input_mode}-mode drafter" + (  # noqa: E731
                f" with feature_layers {c.feature_layers}" if c.feature_layers else ""))
            raise ValueError(
                f"init_from={path!r} is a {describe(theirs)}; this run trains a "
                f"{describe(ours)}: set --config.drafter.num_masks, input_mode and "
                "feature_layers to match, or start from scratch")
        return jax.tree.map(lambda x, a: jax.device_put(x.astype(a.dtype), a.sharding), params,
                            abstract.params)

    # --- the loop ----------------------------------------------------------------------------

    def train(self, source: Sequence, evaluate: Callable[[Any], dict] | None = None,
              on_metrics: Callable[[int, dict], None] | None = None) -> list[dict]:
        """Runs to `total_steps`; returns the logged metrics (one dict per logged step)."""
        cfg = self.config
        os.makedirs(cfg.workdir, exist_ok=True)
        ckpt = checkpoint.Checkpointer(cfg.workdir, cfg.keep_checkpoints, cfg.checkpoint_every,
                                       cfg.async_checkpoint)
        position = self.restore_or_init(ckpt)
        start = int(self.state.step)
        flops = step_flops(self.target.config, self.drafter.config, cfg.batch_size,
                           cfg.max_length, cfg.loss.num_anchors, bool(cfg.loss.dense_weight))
        rng = jax.random.PRNGKey(cfg.seed)
        history, window_start, window_steps, window_tokens = [], time.perf_counter(), 0, 0
        stream = data.batches(source, cfg.batch_size, cfg.max_length, cfg.seed, position)
        summaries = tensorboardX.SummaryWriter(os.path.join(cfg.workdir, "tensorboard"))
        with open(os.path.join(cfg.workdir, "metrics.jsonl"), "a") as log_file:
            for step in range(start, cfg.total_steps):
                position, batch = next(stream)
                with sharding.activate(self.mesh, cfg.rules):
                    self.state, metrics = self._step(self.state, self.target_params, batch,
                                                     rng)
                window_steps += 1
                window_tokens += int(batch["lengths"].sum())
                done = step + 1 == cfg.total_steps
                if (step + 1) % cfg.log_every == 0 or done:
                    metrics = jax.tree.map(lambda x: np.asarray(x).tolist(), metrics)
                    seconds = time.perf_counter() - window_start
                    metrics.update(step=step + 1, steps_per_s=window_steps / seconds,
                                   tokens_per_s=window_tokens / seconds,
                                   mfu=flops * window_steps / seconds / (cfg.peak_tflops * 1e12))
                    if evaluate is not None and cfg.eval_every and (
                            (step + 1) % cfg.eval_every == 0 or done):
                        metrics.update(evaluate(self.state.params))
                    history.append(metrics)
                    _write_summaries(summaries, step + 1, metrics)
                    log_file.write(json.dumps(metrics) + "\n")
                    log_file.flush()
                    if metrics["nonfinite_in_a_row"] >= cfg.max_nonfinite_steps:
                        ckpt.save(step + 1, self.state, self._meta(position), force=True)
                        ckpt.wait()
                        ckpt.close()
                        raise FloatingPointError(
                            f"step {step + 1}: the gradients were not finite for the last "
                            f"{metrics['nonfinite_in_a_row']} steps (all skipped; "
                            f"{metrics['skipped_steps']} skipped in all); the parameters are "
                            f"still finite and saved in {cfg.workdir}. Lower the learning rate, "
                            f"or look for the batch that starts it in metrics.jsonl")
                    if on_metrics is not None:
                        on_metrics(step + 1, metrics)
                    window_start, window_steps, window_tokens = time.perf_counter(), 0, 0
                ckpt.save(step + 1, self.state, self._meta(position), force=done)
        ckpt.wait()
        ckpt.close()
        summaries.close()
        return history


def _write_summaries(writer, step: int, metrics: dict) -> None:
    """TensorBoard scalars; per-position metrics become `name/pos{m}`."""
    for name, value in metrics.items():
        if isinstance(value, list):
            for position, x in enumerate(value, start=1):
                writer.add_scalar(f"{name}/pos{position}", x, step)
        else:
            writer.add_scalar(name, value, step)
    writer.flush()
