"""Mixture-of-Depths (Raposo et al., "Mixture-of-Depths: Dynamically allocating compute in transformer-based
language models", arXiv 2404.02258, 2024).

num_layers distinct decoder layers. Layers mod_every - 1, 2 * mod_every - 1, ... are routed; the others process every
token. A routed layer has its own linear router (d_model -> 1, no bias, on the raw residual stream) and keeps the
k = max(1, floor(mod_capacity * T)) tokens of each sequence with the highest logits (expert-choice; ties go to the
earlier position). A kept token t becomes

    x_t + r_t * f(x_t)        f = the layer's residual branch (attention and MLP), r_t = sigmoid(logit_t)

so the router weight scales the branch, never the residual, and a token that is not kept passes unchanged. Kept
tokens attend causally among themselves only, with their original RoPE positions.

Choice where the paper is open: the paper multiplies f by the raw router output. Here the weight is
sigmoid(logit), which is positive and bounded, so a kept token's branch never flips sign, and the decoding rule
"route when logit > 0" is the same as "weight > 0.5".

Execution: "gathered" computes the branch of the k kept tokens only, which saves compute; "masked" computes every
token and keeps the kept tokens' updates. Both give the same result.

Decoding (`causal_routing=True`, masked computation): top-k over the sequence depends on later tokens, so a token is
routed when its logit is > 0. With model.causality="bce" the router's own logits are trained towards top-k membership
by an auxiliary BCE loss; with "aux_router" a small MLP predictor on stop_gradient(x) is trained by that loss instead
(and gets its own learning rate), so it cannot change the LM.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.layers import causal_mask, decoder_layer_class
from mor_jax.model.residual_branch import ResidualBranch, executed_key_mask, remat_class
from mor_jax.model.routing import router_bce_loss, router_logits, router_params, router_z_loss, top_k_indices, top_k_mask


def routed_layers(config: ModelConfig) -> tuple[int, ...]:
    """Indices of the layers that Mixture-of-Depths routes."""
    every = config.mod_every
    return tuple(i for i in range(config.num_layers) if i % every == every - 1)


def mod_kept_count(config: ModelConfig, seq_len: int) -> int:
    """k = max(1, floor(mod_capacity * seq_len)), the tokens a routed layer keeps per sequence."""
    # The small epsilon keeps floor(c * T) exact where the float product rounds just below an integer.
    return max(1, int(config.mod_capacity * seq_len + 1e-9))


class RoutedLayer(nn.Module):
    """One routed layer: router, token selection and the gated residual branch.

    h: [B, T, D]; positions: int [B, T]. Returns (new h, outputs) with outputs of shape [B, T]: `kept` (tokens the
    layer processed), `top_k` (the training-time selection, the BCE target), `logits` (the router's) and
    `decode_logits` (what decoding routes by).
    """

    config: ModelConfig
    causal_routing: bool = False

    @nn.compact
    def __call__(self, h, positions):
        cfg = self.config
        batch, seq = h.shape[:2]
        logits = router_logits(router_params(self, cfg, "router", (), 1, cfg.router_type == "mlp"), h)[..., 0]
        decode_logits = logits
        if cfg.causality == "aux_router":
            predictor = router_params(self, cfg, "aux_router", (), 1, mlp=True)
            decode_logits = router_logits(predictor, jax.lax.stop_gradient(h))[..., 0]
        k = mod_kept_count(cfg, seq)
        every_token = jnp.ones((batch, seq), bool)
        top_k = top_k_mask(jax.lax.stop_gradient(logits), every_token, k)
        weight = jax.nn.sigmoid(logits)[..., None].astype(h.dtype)  # [B, T, 1]
        branch = remat_class(cfg, ResidualBranch)(cfg, name="branch")

        if self.causal_routing or cfg.execution == "masked":
            kept = decode_logits > 0.0 if self.causal_routing else top_k
            delta = branch(h, positions, executed_key_mask(kept))
            new_h = jnp.where(kept[..., None], h + weight * delta, h)
        else:
            kept = top_k
            indices = top_k_indices(jax.lax.stop_gradient(logits), every_token, k)  # ascending positions
            rows = jnp.arange(batch)[:, None]
            x = jnp.take_along_axis(h, indices[..., None], axis=1)
            kept_positions = jnp.take_along_axis(positions, indices, axis=1)
            mask = kept_positions[:, None, :] <= kept_positions[:, :, None]  # causal among the kept tokens
            delta = branch(x, kept_positions, mask)
            kept_weight = jnp.take_along_axis(weight, indices[..., None], axis=1)
            # The scatter replaces the kept rows with x + r * f(x); it adds nothing to the old state.
            new_h = h.at[rows, indices].set(x + kept_weight * delta)
        outputs = {"kept": kept, "top_k": top_k, "logits": logits, "decode_logits": decode_logits}
        return new_h, outputs


class MixtureOfDepths(nn.Module):
    """The decoder stack of a Mixture-of-Depths model: plain layers and routed layers, named layer_0 .. layer_{L-1}.

    h: [B, T, D] (embedded tokens); positions: int [B, T]. Returns (h, aux) with the keys `LanguageModel` documents:
    kept [routed layers, B, T], kept_fraction, depth (layers each token received), router_logits (the decoding
    logits), router_bce, router_z_loss and router_loss.
    """

    config: ModelConfig
    causal_routing: bool = False

    @nn.compact
    def __call__(self, h, positions):
        cfg = self.config
        batch, seq = h.shape[:2]
        mask = causal_mask(batch, seq)
        layer_class = decoder_layer_class(cfg)
        routed = routed_layers(cfg)
        per_layer = []
        for i in range(cfg.num_layers):
            if i in routed:
                h, outputs = RoutedLayer(cfg, self.causal_routing, name=f"layer_{i}")(h, positions)
                per_layer.append(outputs)
            else:
                h, _ = layer_class(cfg, name=f"layer_{i}")(h, positions, mask)
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)  # [routed layers, B, T] each

        every_token = jnp.ones_like(stacked["kept"])
        bce = router_bce_loss(stacked["decode_logits"], stacked["top_k"], every_token)
        z_loss = router_z_loss(stacked["logits"], every_token)
        kept = stacked["kept"]
        aux = {
            "kept": kept,
            "kept_fraction": jnp.mean(kept.astype(jnp.float32), axis=(1, 2)),
            "depth": cfg.num_layers - len(routed) + jnp.sum(kept.astype(jnp.int32), axis=0),
            "router_logits": stacked["decode_logits"],
            "router_bce": bce,
            "router_z_loss": z_loss,
            "router_loss": cfg.router_bce_coef * bce + cfg.router_z_loss_coef * z_loss,
        }
        return h, aux
