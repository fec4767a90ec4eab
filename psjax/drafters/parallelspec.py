"""ParallelSpec (arXiv 2410.05589): k + 1 draft tokens from ONE pass of a one-layer drafter.

After the real tokens, k learned mask tokens MASK_1..MASK_k are appended as placeholders of the
future tokens: MASK_m sits at position anchor + m (the anchor being the last real token, the
root) and, like every position of a language model, predicts the token after it, i.e. the
target's distribution at position anchor + m. The anchor's own output predicts the first draft
token (as EAGLE's drafter does), so one pass yields k + 1 drafts. The drafter is one decoder
layer shaped like the target's; it reuses the target's frozen embedding table and LM head, and
owns only the layer, the mask embeddings, a final norm, and (feature mode) the fusion of target
features.

Choices the paper leaves open, written down here (docs/parallelspec.md measures them):
- Input mode. `token`: real tokens enter as the target's embeddings. `feature` (EAGLE-style):
  real token j enters as fc([embed(x_j); h_{j-1}]), h_{j-1} being the target's last hidden state
  (after its final norm) at the previous position, i.e. the feature that produced x_j; masks
  enter as fc([mask_embed_m; f_mask]) with a learned placeholder feature f_mask. With
  `feature_layers` (EAGLE-3's fusion of low, middle and high layers), h_{j-1} is several of the
  target's layer outputs side by side (`Transformer.feature_layers`).
- Attention. Real tokens attend causally to real tokens only. MASK_m of a group attends to the
  real tokens up to its anchor and to MASK_1..MASK_m of its own group, never to another group.
  `attention_pattern` builds this from per-token ids, and the same builder serves training
  (a group after many anchors at once) and drafting (one group after the root), so the test that
  the two agree compares one code path in its two modes.
- Mask token ids are vocab_size .. vocab_size + k - 1: beyond the target's vocabulary.
- What each position predicts. A first version had MASK_m predict the token at its own position
  (k masks, k drafts, the anchor's output unused); on SmolLM2 its first draft agreed with the
  target only ~50% of the time after 4,000 steps, since the anchor's information reached MASK_1
  through attention alone. Predicting from the anchor itself is what EAGLE does for its first
  token, and the masks then act as placeholders of drafts 1..k (docs/parallelspec.md).

Axis legend: B batch, T tokens, S cache slots, D model dim, V vocab, K draft length (masks).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from psjax.decoding.sampling import Sampling
from psjax.drafters.base import Accepted, Context, Drafter, Prompt, Proposal
from psjax.drafters.draft_model import candidates_from_logits
from psjax.drafters.draft_vocab import DraftVocab
from psjax.models import kv_cache
from psjax.models.config import ModelConfig
from psjax.models.kv_cache import KVCache
from psjax.models.llama import DecoderLayer, RMSNorm, Transformer, causal_mask

INPUT_MODES = ("token", "feature")
NO_GROUP = -1  # the group id of real tokens
_FAR = jnp.iinfo(jnp.int32).max  # the anchor of padding: nothing sees it


@dataclasses.dataclass(frozen=True)
class ParallelSpecConfig:
    target: ModelConfig  # the target's shapes: the drafter's layer mirrors them
    num_masks: int = 3  # k (experiments/configs/parallelspec.py says why 3)
    input_mode: str = "feature"
    # Feature mode: the target layers read (Transformer.feature_layers: n = the residual stream
    # after n layers, normalised; n = num_hidden_layers the final hidden state). Empty: the
    # final hidden state alone.
    feature_layers: tuple[int, ...] = ()

    def __post_init__(self):
        if self.num_masks < 1:
            raise ValueError(f"num_masks (k) must be >= 1, got {self.num_masks}")
        if self.input_mode not in INPUT_MODES:
            raise ValueError(f"input_mode must be one of {INPUT_MODES}, got {self.input_mode!r}")
        layers = tuple(self.feature_layers)
        object.__setattr__(self, "feature_layers", layers)
        num_layers = self.target.num_hidden_layers
        if layers and self.input_mode != "feature":
            raise ValueError(f"feature_layers {layers} needs input_mode='feature'")
        if layers and (list(layers) != sorted(set(layers)) or layers[0] < 1
                       or layers[-1] > num_layers):
            raise ValueError(f"feature_layers must be increasing layer counts in 1.."
                             f"{num_layers} (the target's layers), got {layers}")

    @property
    def feature_size(self) -> int:
        """Width of the target features a real token enters with (feature mode)."""
        return self.target.hidden_size * max(1, len(self.feature_layers))

    @property
    def mask_token_ids(self) -> tuple[int, ...]:
        v = self.target.vocab_size
        return tuple(range(v, v + self.num_masks))

    @property
    def draft_length(self) -> int:
        """Drafts per pass: the anchor's prediction, then one per mask."""
        return self.num_masks + 1

    @property
    def layer_config(self) -> ModelConfig:
        return dataclasses.replace(self.target, num_hidden_layers=1)


def attention_pattern(q_anchor, q_group, q_rank, k_anchor, k_group, k_rank) -> jax.Array:
    """[B, Tq, Tk] visibility from per-token ids ([B, T] each).

    A real token has group NO_GROUP, its own position as anchor and rank 0; MASK_m of a group
    has that group's id, the group's anchor position and rank m. Padding has anchor _FAR."""
    k_real = (k_group == NO_GROUP)[:, None, :]
    sees_real = k_real & (k_anchor[:, None, :] <= q_anchor[:, :, None])
    same_group = (k_group[:, None, :] == q_group[:, :, None]) & (q_group[:, :, None] != NO_GROUP)
    sees_mask = same_group & (k_rank[:, None, :] <= q_rank[:, :, None])
    return sees_real | sees_mask


class ParallelDrafterModule(nn.Module):
    """The drafter network. Returns post-norm hidden states; logits come from the target's head."""

    config: ParallelSpecConfig
    dtype: jnp.dtype = jnp.float32
    param_dtype: jnp.dtype = jnp.float32
    # How the group-wise training pass (no cache) attends: Transformer.uncached_attention.
    uncached_attention: str = "einsum"

    @nn.compact
    def __call__(self, embedding: jax.Array, tokens: jax.Array, features: jax.Array | None,
                 positions: jax.Array, mask: jax.Array, cache_kv=None, starts=None,
                 prefill=False):
        """embedding [V, D]: the target's (frozen) table. tokens [B, T]: real ids, or mask ids
        >= V. features [B, T, F]: h_{j-1} for real tokens (feature mode; ignored at masks;
        F = config.feature_size).
        mask: [B, T, T] without a cache or with `prefill` (the cache is empty: Attention), or
        None there for causal attention (a jax.nn.dot_product_attention implementation);
        [B, T, S] with a cache."""
        c = self.config
        d, v = c.target.hidden_size, c.target.vocab_size
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        mask_embed = self.param(
            "mask_embed", nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                       ("masks", "embed")),
            (c.num_masks, d), self.param_dtype)
        is_mask = tokens >= v
        x = jnp.where(is_mask[..., None],
                      jnp.take(mask_embed, jnp.clip(tokens - v, 0, c.num_masks - 1), axis=0),
                      jnp.take(embedding, jnp.clip(tokens, 0, v - 1), axis=0)).astype(self.dtype)
        if c.input_mode == "feature":
            placeholder = self.param(
                "mask_feature", nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                (c.feature_size,), self.param_dtype)
            feats = jnp.where(is_mask[..., None], placeholder.astype(self.dtype),
                              features.astype(self.dtype))
            x = nn.Dense(d, use_bias=True, name="fc", **kw,
                         kernel_init=nn.with_logical_partitioning(
                             nn.initializers.normal(0.02), ("fused", "embed")),
                         bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                                                ("embed",)))(
                jnp.concatenate([x, feats], axis=-1))
        layer = DecoderLayer(c.layer_config, name="layer",
                             uncached_attention=self.uncached_attention, **kw)
        x, new_kv = layer(x, positions, mask, cache_kv, starts, prefill)
        return RMSNorm(c.target.rms_norm_eps, name="norm", **kw)(x), new_kv


def target_embedding(target_params) -> jax.Array:
    return target_params["embed_tokens"]["embedding"]


def target_logits(target_module: Transformer, target_params, hidden: jax.Array) -> jax.Array:
    return target_module.apply({"params": target_params}, hidden, method=Transformer.logits)


def head_rows(target_module: Transformer, target_params, ids: jax.Array) -> jax.Array:
    """The rows [N, D] of the target's LM head that give the logits of tokens `ids`."""
    if target_module.config.tie_word_embeddings:
        rows = target_embedding(target_params)[ids]
    else:
        rows = target_params["lm_head"]["kernel"][:, ids].T
    return rows.astype(target_module.dtype)


@flax.struct.dataclass
class DraftState:
    cache: KVCache  # the drafter's own cache: real tokens only
    pending_features: jax.Array  # [B, R, D] h_{j-1} for the tokens not yet in the cache
    head: jax.Array | None = None  # [N, D] the LM head's rows of a draft vocabulary


@dataclasses.dataclass(frozen=True)
class ParallelSpec(Drafter):
    """The drafter as the engine sees it. `module` and `target_module` are static."""

    module: ParallelDrafterModule
    target_module: Transformer
    # Drafts come from these tokens only (psjax.drafters.draft_vocab); None: the whole vocabulary.
    draft_vocab: DraftVocab | None = None

    @property
    def config(self) -> ParallelSpecConfig:
        return self.module.config

    @property
    def vocab_size(self):
        return self.config.target.vocab_size

    @property
    def max_depth(self):
        return self.config.draft_length

    @property
    def feature_layers(self) -> tuple[int, ...]:
        return self.config.feature_layers

    def _forward(self, params, context_params, tokens, features, positions, mask, cache,
                 starts, prefill=False):
        hidden, kv = self.module.apply(
            {"params": params}, target_embedding(context_params), tokens, features, positions,
            mask, None if cache is None else (cache.k, cache.v), starts, prefill)
        return hidden, kv

    def _commit_width(self, depth: int | None) -> int:
        """Real tokens one step can commit: the accepted drafts and the bonus token. A tree
        deeper than k + 1 comes from a drafter in front of this one (with_lookup)."""
        return max(depth or 0, self.config.draft_length) + 1

    def init_state(self, params, prompt: Prompt, context: Context, cache_length: int,
                   depth: int | None = None):
        b, p = prompt.tokens.shape
        d = self.config.feature_size
        # Real token j reads h_{j-1}: shift the prompt's features right by one.
        shifted = jnp.concatenate([jnp.zeros((b, 1, d), prompt.features.dtype),
                                   prompt.features[:, :-1]], axis=1)
        cache = KVCache.create(self.config.layer_config, b, cache_length, self.module.dtype)
        positions = jnp.broadcast_to(jnp.arange(p, dtype=jnp.int32), (b, p))
        causal = causal_mask(b, p, self.module.uncached_attention)  # as the target's
        _, (k, v) = self._forward(params, context.target_params, prompt.tokens, shifted,
                                  positions, causal, cache, cache.lengths, prefill=True)
        cache = cache.replace(k=k, v=v, lengths=prompt.lengths)
        width = self._commit_width(depth)
        last = jnp.take_along_axis(prompt.features, (prompt.lengths - 1)[:, None, None], axis=1)
        pending = jnp.zeros((b, width, d), prompt.features.dtype).at[:, :1].set(last)
        head = None if self.draft_vocab is None else head_rows(
            self.target_module, context.target_params, jnp.asarray(self.draft_vocab.ids))
        return DraftState(cache, pending, head)

    def cache_lookahead(self, depth: int) -> int:
        # One step writes the pending real tokens and k masks after the root.
        return self._commit_width(depth) + self.config.num_masks

    def draft_logits(self, params, state: DraftState, context: Context):
        """Draft logits [B, k + 1, V] after the committed sequence (the root's, then
        MASK_1..MASK_k's), and the new state (the real tokens committed to the drafter's cache,
        the masks rolled back). With a draft vocabulary, [B, k + 1, N] over its tokens."""
        cfg, cache = self.config, state.cache
        b = context.sequence.shape[0]
        r = state.pending_features.shape[1]
        k = cfg.num_masks
        # Real tokens committed since the last step (root included), then MASK_1..MASK_k.
        real_pos = cache.lengths[:, None] + jnp.arange(r)
        real_valid = real_pos < context.seq_len[:, None]
        real_tok = jnp.take_along_axis(context.sequence,
                                       jnp.clip(real_pos, 0, context.sequence.shape[1] - 1), 1)
        anchor = context.seq_len - 1  # the root
        tokens = jnp.concatenate([real_tok, jnp.broadcast_to(
            jnp.asarray(cfg.mask_token_ids, jnp.int32), (b, k))], axis=1)
        positions = jnp.concatenate([real_pos, anchor[:, None] + jnp.arange(1, k + 1)], axis=1)
        features = jnp.concatenate([state.pending_features, jnp.zeros(
            (b, k, state.pending_features.shape[-1]), state.pending_features.dtype)], axis=1)
        ids_anchor = jnp.concatenate([jnp.where(real_valid, real_pos, _FAR),
                                      jnp.broadcast_to(anchor[:, None], (b, k))], axis=1)
        ids_group = jnp.concatenate([jnp.full((b, r), NO_GROUP), jnp.zeros((b, k), int)], 1)
        ids_rank = jnp.concatenate([jnp.zeros((b, r), int),
                                    jnp.broadcast_to(jnp.arange(1, k + 1), (b, k))], axis=1)
        block = attention_pattern(ids_anchor, ids_group, ids_rank, ids_anchor, ids_group,
                                  ids_rank)
        mask = kv_cache.attention_mask(cache.lengths, block, cache.max_length)
        hidden, (kk, vv) = self._forward(params, context.target_params, tokens, features,
                                         positions, mask, cache, cache.lengths)
        # Rows that are done have nothing pending: clip their (unused) root index.
        root_index = jnp.maximum(anchor - cache.lengths, 0)
        root = jnp.take_along_axis(hidden, root_index[:, None, None], axis=1)
        drafts = jnp.concatenate([root, hidden[:, r:]], axis=1)
        if state.head is None:
            logits = target_logits(self.target_module, context.target_params, drafts)
        else:  # Transformer.logits' product over the draft vocabulary's rows
            logits = jnp.einsum("...d,nd->...n", drafts, state.head.astype(drafts.dtype),
                                preferred_element_type=jnp.float32)
        # Commit the real tokens; the masks' entries are rolled back (never committed).
        cache = cache.replace(k=kk, v=vv, lengths=context.seq_len)
        return logits, state.replace(cache=cache)

    def propose(self, params, state: DraftState, context: Context, depth, width,
                sampling: Sampling, rng):
        logits, state = self.draft_logits(params, state, context)
        keys = jax.random.split(rng, depth)
        cands, q = jax.vmap(lambda l, key: candidates_from_logits(l, width, sampling, key),
                            in_axes=(1, 0), out_axes=1)(logits[:, :depth], keys)
        if self.draft_vocab is not None:  # back to the target's token ids
            ids = jnp.asarray(self.draft_vocab.ids)
            cands = ids[cands]
            if q is not None:
                q = jnp.zeros(q.shape[:-1] + (self.vocab_size,), q.dtype).at[..., ids].set(q)
        return Proposal(cands, q), state

    def training_logits(self, params, target_params, tokens: jax.Array,
                        target_features: jax.Array, anchors: jax.Array,
                        lengths: jax.Array) -> jax.Array:
        """Group-wise parallel training: one pass over a whole sequence and a group of k masks
        after each anchor. tokens [B, L], target_features [B, L, F] (the target's features:
        `Output.features` of a target with this drafter's `feature_layers`), anchors [B, G]
        positions, lengths [B] real tokens per row.
        Returns the draft logits of every group [B, G, k + 1, V]: index j predicts the token at
        anchors[g] + j + 1 (j = 0 from the anchor itself, j = m from MASK_m), each seeing exactly
        what it sees when drafting after that anchor."""
        groups, _ = self.training_hidden(params, target_params, tokens, target_features, anchors,
                                         lengths)
        return target_logits(self.target_module, target_params, groups)

    def training_hidden(self, params, target_params, tokens: jax.Array,
                        target_features: jax.Array, anchors: jax.Array,
                        lengths: jax.Array) -> tuple[jax.Array, jax.Array]:
        """`training_logits`' pass, before the LM head: the groups' hidden states [B, G, k+1, D]
        and every real position's [B, L, D] (position j's is the first draft it would give as
        the anchor: the trainer's dense first-draft loss reads them)."""
        cfg = self.config
        b, length = tokens.shape
        g, k = anchors.shape[1], cfg.num_masks
        pos = jnp.broadcast_to(jnp.arange(length, dtype=jnp.int32), (b, length))
        shifted = jnp.concatenate([jnp.zeros_like(target_features[:, :1]),
                                   target_features[:, :-1]], axis=1)
        rank = jnp.broadcast_to(jnp.arange(1, k + 1, dtype=jnp.int32), (b, g, k))
        group_anchor = jnp.broadcast_to(anchors[:, :, None], (b, g, k))
        group_id = jnp.broadcast_to(jnp.arange(g, dtype=jnp.int32)[None, :, None], (b, g, k))
        mask_tok = jnp.broadcast_to(jnp.asarray(cfg.mask_token_ids, jnp.int32), (b, g, k))
        flat = lambda x: x.reshape(b, g * k)
        ids_anchor = jnp.concatenate([jnp.where(pos < lengths[:, None], pos, _FAR),
                                      flat(group_anchor)], axis=1)
        ids_group = jnp.concatenate([jnp.full((b, length), NO_GROUP, jnp.int32),
                                     flat(group_id)], axis=1)
        ids_rank = jnp.concatenate([jnp.zeros((b, length), jnp.int32), flat(rank)], axis=1)
        mask = attention_pattern(ids_anchor, ids_group, ids_rank, ids_anchor, ids_group,
                                 ids_rank)
        hidden, _ = self._forward(
            params, target_params, jnp.concatenate([tokens, flat(mask_tok)], axis=1),
            jnp.concatenate([shifted, jnp.zeros((b, g * k, shifted.shape[-1]),
                                                shifted.dtype)], axis=1),
            jnp.concatenate([pos, flat(group_anchor + rank)], axis=1), mask, None, None)
        at_anchor = jnp.take_along_axis(hidden, anchors[:, :, None], axis=1)[:, :, None]
        at_masks = hidden[:, length:].reshape(b, g, k, -1)
        return jnp.concatenate([at_anchor, at_masks], axis=2), hidden[:, :length]

    def commit(self, params, state: DraftState, accepted: Accepted):
        # The tokens kept this step (accepted drafts + bonus) read the features of the nodes
        # before them: the old root and the accepted drafts, i.e. path_features[:, :num_path].
        r = state.pending_features.shape[1]
        path_features = accepted.path_features.astype(state.pending_features.dtype)
        path_features = jnp.pad(path_features, ((0, 0), (0, r - path_features.shape[1]), (0, 0)))
        keep = jnp.arange(r)[None, :, None] < accepted.num_path[:, None, None]
        features = jnp.where(keep, path_features, 0)
        return state.replace(pending_features=features)


def build(config: ParallelSpecConfig, target_module: Transformer, dtype=jnp.float32,
          param_dtype=None, draft_vocab: DraftVocab | None = None) -> ParallelSpec:
    """`dtype` computes, `param_dtype` stores (float32 master weights for training). The
    training pass attends as the target module's passes without a cache do. `draft_vocab`:
    drafting proposes from its tokens only (training always sees the whole vocabulary)."""
    if draft_vocab is not None and int(draft_vocab.ids.max()) >= config.target.vocab_size:
        raise ValueError(f"the draft vocabulary holds token id {int(draft_vocab.ids.max())} but "
                         f"the target's vocabulary has {config.target.vocab_size} tokens")
    module = ParallelDrafterModule(config, dtype=dtype, param_dtype=param_dtype or dtype,
                                   uncached_attention=target_module.uncached_attention)
    return ParallelSpec(module, target_module, draft_vocab)


def init_params(drafter: ParallelSpec, rng: jax.Array, unbox: bool = True) -> Any:
    """Fresh drafter parameters: a small random layer. `unbox=False` keeps Flax's logical
    partitioning metadata (for sharded init)."""
    cfg = drafter.config
    t = 2 + cfg.num_masks
    tokens = jnp.zeros((1, t), jnp.int32)
    embedding = jnp.zeros((cfg.target.vocab_size, cfg.target.hidden_size), drafter.module.dtype)
    features = jnp.zeros((1, t, cfg.feature_size), drafter.module.dtype)
    positions = jnp.arange(t)[None]
    mask = jnp.ones((1, t, t), bool)
    params = drafter.module.init(rng, embedding, tokens, features, positions, mask)["params"]
    return nn.meta.unbox(params) if unbox else params
