"""Leap-of-Thought (Kim et al., "Leap-of-Thought: Accelerating Transformers via Dynamic Token Routing", EMNLP 2023),
adapted to causal decoders.

num_layers distinct decoder layers, each with a router (d_model -> 1, no bias) that lets a token leap over the layer.
A leaped token keeps its state and enters the next layer unchanged, where its router decides again. Layer l maps an
executed token's state x to x + f(x), f being the layer's residual branch; a leaped token stays x.

Leaped tokens are summarised, not dropped. At every layer, query t may attend to one context key and value: the mean
of the keys (RoPE applied at each token's own position) and of the values of the tokens before t that leaped over
this layer. The executed tokens attend causally to the executed keys and to that context.

Adaptation from the encoder original, where a leaped token is still visible through one context token summarising
all leaped tokens of the sequence:
- The summary is a prefix mean over positions strictly before t, so no token attends to a later token.
- The summary is built in key/value space (the mean of the leaped tokens' keys and values at this layer) rather than
  as a pooled hidden state fed through the projections. Values are linear in the normalised state, so for values
  the two are the same; for keys, each leaped token keeps its own rotary position.
- The leap decision is hard, with a deterministic straight-through estimator (forward value 0 or 1, gradient of
  sigmoid(logit)), as in `mor_jax.model.dllm`.
- The leap rate is set by the same rate loss as D-LLM, rate_loss_coef * (executed fraction -
  target_execution_rate)^2.

NOTE: the original trains its routers with gradient-based importance targets; that scheme is not reproduced here,
so this model differs from D-LLM only in what leaped tokens leave behind (a visible summary instead of nothing) and
in having no always-executed first tokens.

Execution is masked only: every token is computed at every layer and the decisions select the updates.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.dllm import execution_aux
from mor_jax.model.layers import MLP, RMSNorm, apply_rope, dtype_of, weight_init
from mor_jax.model.residual_branch import executed_key_mask, remat_class
from mor_jax.model.routing import router_logits, router_params, straight_through_decision


def _exclusive_prefix_sum(x):
    """Sum over positions strictly before t, along axis 1: out[:, t] = x[:, :t].sum(axis=1)."""
    shifted = jnp.concatenate([jnp.zeros_like(x[:, :1]), x[:, :-1]], axis=1)
    return jnp.cumsum(shifted, axis=1)


class SummaryAttention(nn.Module):
    """Grouped-query attention over the executed tokens plus a causal summary of the leaped ones.

    x: [B, T, D] (normalised); positions: int [B, T]; executed: bool [B, T]. Query t attends to the executed keys at
    or before t, to its own key and to its context key, the mean key and value of the tokens before t that leaped.
    The context is masked out while no token before t has leaped. Parameters have `Attention`'s names and shapes.
    Returns [B, T, D].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, executed):
        cfg = self.config
        dtype = dtype_of(cfg)
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def projection(name, features, axes):
            return nn.DenseGeneral(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                   kernel_init=weight_init(cfg, axes), name=name)

        q = apply_rope(projection("query", (heads, head_dim), ("embed", "heads", "kv"))(x), positions, cfg.rope_theta)
        k = apply_rope(projection("key", (kv_heads, head_dim), ("embed", "kv_heads", "kv"))(x), positions,
                       cfg.rope_theta)
        v = projection("value", (kv_heads, head_dim), ("embed", "kv_heads", "kv"))(x)

        leaped = (~executed).astype(jnp.float32)[:, :, None, None]  # [B, T, 1, 1]
        count = _exclusive_prefix_sum(leaped)
        context_k = _exclusive_prefix_sum(k.astype(jnp.float32) * leaped) / jnp.maximum(count, 1.0)  # [B, T, K, Dh]
        context_v = _exclusive_prefix_sum(v.astype(jnp.float32) * leaped) / jnp.maximum(count, 1.0)
        has_context = count[:, :, 0, 0] > 0  # [B, T]

        batch, seq = x.shape[:2]
        q = q.reshape(batch, seq, kv_heads, heads // kv_heads, head_dim).astype(jnp.float32)
        scale = 1.0 / jnp.sqrt(jnp.float32(head_dim))
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k.astype(jnp.float32)) * scale
        scores = jnp.where(executed_key_mask(executed)[:, None, None], scores, jnp.finfo(jnp.float32).min)
        context_scores = jnp.einsum("btkgd,btkd->bkgt", q, context_k) * scale
        context_scores = jnp.where(has_context[:, None, None, :], context_scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(jnp.concatenate([scores, context_scores[..., None]], axis=-1), axis=-1)

        out = jnp.einsum("bkgts,bskd->btkgd", probs[..., :seq], v.astype(jnp.float32))
        out = out + jnp.einsum("bkgt,btkd->btkgd", probs[..., seq], context_v)
        out = out.reshape(batch, seq, heads, head_dim).astype(dtype)
        return nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=weight_init(cfg, ("heads", "kv", "embed")), name="out",
        )(out)


class LeapLayer(nn.Module):
    """A router and the decoder layer it lets tokens leap over.

    h: [B, T, D]; positions: int [B, T]. Returns (new h, outputs) with `executed` bool [B, T], `decision` float32
    [B, T] (straight-through) and `logits` [B, T].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h, positions):
        cfg = self.config
        logits = router_logits(router_params(self, cfg, "router", (), 1, cfg.router_type == "mlp"), h)[..., 0]
        executed, decision = straight_through_decision(logits)
        attended = SummaryAttention(cfg, name="attention")(RMSNorm(cfg, name="attention_norm")(h), positions, executed)
        mixed = MLP(cfg, name="mlp")(RMSNorm(cfg, name="mlp_norm")(h + attended))
        new_h = h + decision[..., None].astype(h.dtype) * (attended + mixed)
        return new_h, {"executed": executed, "decision": decision, "logits": logits}


class LeapOfThought(nn.Module):
    """The decoder stack of a Leap-of-Thought model, layers named layer_0 .. layer_{L-1}.

    h: [B, T, D] (embedded tokens); positions: int [B, T]. Returns (h, aux) with the keys of `mor_jax.model.dllm.DLLM`.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h, positions):
        layer_class = remat_class(self.config, LeapLayer)
        per_layer = []
        for i in range(self.config.num_layers):
            h, outputs = layer_class(self.config, name=f"layer_{i}")(h, positions)
            per_layer.append(outputs)
        return h, execution_aux(self.config, per_layer)
