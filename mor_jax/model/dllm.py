"""D-LLM (Jiang et al., "D-LLM: A Token Adaptive Computing Resource Allocation Strategy for Large Language Models",
NeurIPS 2024).

num_layers distinct decoder layers, each preceded by a decision module that executes or skips the layer for every
token. Layer l maps a token's state x to

    x + d * f(x)        f = the layer's residual branch, d = 1 (execute) or 0 (skip)

A skipped token writes no keys or values at that layer: no later token attends to it there. The tokens at positions
0 .. dllm_always_execute - 1 execute every layer. A rate loss, rate_loss_coef * (executed fraction -
target_execution_rate)^2 over all (token, layer) pairs, pulls the share of executed pairs to its target.

Choices where the paper is open, made here:
- Decision module: the router of `mor_jax.model.routing` with one output (linear, or an MLP with model.router_type
  = "mlp"), on the raw residual stream. A token executes where its logit is >= 0.
- Hard decision with a deterministic straight-through estimator: the forward value of d is exactly 0 or 1 and its
  gradient is that of sigmoid(logit). The paper samples the decision with Gumbel noise during training. The train
  step here passes no random stream to the model, so no noise is added and training and decoding decide alike.
- Gradient for skipped tokens: the layer computes f for every token (masked execution), a skipped token's f
  attending to the executed keys before it and to its own key, so d receives a gradient on both sides.
- The rate counts the forced first tokens as executed pairs, so the logged rate is the true executed share.
- Causality: every decision depends only on the token's own state, so the model is causal by construction and
  `causal_routing` changes nothing.

Execution is masked only: every token is computed at every layer and the decisions select the updates. The FLOP
counter charges the expected executed share (see `mor_jax.training.flops`).

NOTE: there is no compute-saving path, so a D-LLM train step costs at least a vanilla step in wall time. Skipping
work for real needs per-layer dynamic token counts, which a static-shape gather cannot express.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.residual_branch import ResidualBranch, executed_key_mask, remat_class
from mor_jax.model.routing import execution_rate_loss, router_logits, router_params, straight_through_decision


class DecisionLayer(nn.Module):
    """A decision module and the decoder layer it gates.

    h: [B, T, D]; positions: int [B, T]. Returns (new h, outputs) with `executed` bool [B, T], `decision` float32
    [B, T] (straight-through) and `logits` [B, T].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h, positions):
        cfg = self.config
        logits = router_logits(router_params(self, cfg, "router", (), 1, cfg.router_type == "mlp"), h)[..., 0]
        forced = positions < cfg.dllm_always_execute
        executed, decision = straight_through_decision(logits, forced)
        delta = remat_class(cfg, ResidualBranch)(cfg, name="branch")(h, positions, executed_key_mask(executed))
        new_h = h + decision[..., None].astype(h.dtype) * delta
        return new_h, {"executed": executed, "decision": decision, "logits": logits}


class DLLM(nn.Module):
    """The decoder stack of a D-LLM model, layers named layer_0 .. layer_{L-1}.

    h: [B, T, D] (embedded tokens); positions: int [B, T]. Returns (h, aux): kept [L, B, T] (executed pairs),
    kept_fraction [L], depth [B, T] (layers each token executed), router_logits [L, B, T], execution_rate and
    rate_loss (scalars) and router_loss.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, h, positions):
        per_layer = []
        for i in range(self.config.num_layers):
            h, outputs = DecisionLayer(self.config, name=f"layer_{i}")(h, positions)
            per_layer.append(outputs)
        return h, execution_aux(self.config, per_layer)


def execution_aux(config: ModelConfig, per_layer: list[dict]) -> dict:
    """aux of a stack whose layers each return `executed`, `decision` and `logits` ([B, T] each)."""
    stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_layer)
    executed = stacked["executed"]
    rate_loss, rate = execution_rate_loss(stacked["decision"], config.target_execution_rate)
    return {
        "kept": executed,
        "kept_fraction": jnp.mean(executed.astype(jnp.float32), axis=(1, 2)),
        "depth": jnp.sum(executed.astype(jnp.int32), axis=0),
        "router_logits": stacked["logits"],
        "execution_rate": rate,
        "rate_loss": rate_loss,
        "router_loss": config.rate_loss_coef * rate_loss,
    }
