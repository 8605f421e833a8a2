"""Routers, token selection and the routers' auxiliary losses.

Expert-choice: recursion r keeps k_r tokens of each sequence, the top-k_r router logits among the tokens kept at
recursion r - 1 (hierarchical filtering). Ties are broken towards the earlier position.

Token-choice: one router, applied once after the prelude, gives each token its depth.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mor_jax.config import ModelConfig
from mor_jax.model.layers import weight_init


def top_k_mask(logits, candidates, k):
    """Mark the k highest-scoring candidate tokens of each sequence.

    logits: float [B, T]; candidates: bool [B, T] with at least k True per row; k: int, static or traced (a traced k
    is what lets one `nn.scan` body serve recursions with different capacities). Returns bool [B, T] with exactly k
    True per row, all inside `candidates`.
    """
    scores = jnp.where(candidates, logits.astype(jnp.float32), -jnp.inf)
    order = jnp.argsort(-scores, axis=-1, stable=True)  # positions by descending score
    ranks = jnp.argsort(order, axis=-1, stable=True)  # rank of every position
    return ranks < k


def top_k_indices(logits, candidates, k: int):
    """Positions of the k highest-scoring candidates of each sequence, sorted ascending (causal order).

    Same selection as `top_k_mask` for a static k. Returns int32 [B, k].
    """
    scores = jnp.where(candidates, logits.astype(jnp.float32), -jnp.inf)
    _, indices = jax.lax.top_k(scores, k)
    return jnp.sort(indices, axis=-1).astype(jnp.int32)


def kept_counts(capacities, seq_len: int):
    """k_r = max(1, floor(c_r * seq_len)) for traced capacities [N_r]; int32 [N_r]."""
    # The small epsilon keeps floor(2/3 * 3) at 2 despite rounding in the float product.
    return jnp.maximum(1, jnp.floor(capacities * seq_len + 1e-6)).astype(jnp.int32)


def warmup_capacities(config: ModelConfig, step):
    """Capacity warm-up: a cosine from 1.0 at step 0 to the configured capacities at capacity_warmup_steps."""
    target = jnp.asarray(config.capacity_fractions(), jnp.float32)
    if not config.capacity_warmup_steps:
        return target
    progress = jnp.clip(step / config.capacity_warmup_steps, 0.0, 1.0)
    weight = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))  # 1 -> 0
    return target + (1.0 - target) * weight


def router_params(module: nn.Module, config: ModelConfig, name: str, leading: tuple, outputs: int,
                  mlp: bool) -> dict:
    """Create router weights with leading axes `leading` (e.g. (N_r,) for one router per recursion).

    Linear: {"kernel": [*leading, D, outputs]}. MLP: also {"hidden": [*leading, D, H]}, and kernel is [*leading, H,
    outputs]; the hidden activation is GELU. No biases.
    """
    lead_axes = ("recursions",) * len(leading)
    width = config.router_mlp_dim or config.d_model
    params = {}
    if mlp:
        params["hidden"] = module.param(f"{name}_hidden", weight_init(config, lead_axes + ("embed", "mlp")),
                                        (*leading, config.d_model, width))
        params["kernel"] = module.param(f"{name}_kernel", weight_init(config, lead_axes + ("mlp", None)),
                                        (*leading, width, outputs))
    else:
        params["kernel"] = module.param(f"{name}_kernel", weight_init(config, lead_axes + ("embed", None)),
                                        (*leading, config.d_model, outputs))
    return params


def router_logits(params: dict, h):
    """Apply one router (no leading axes left) to h [B, T, D] in float32; returns [B, T, outputs]."""
    x = h.astype(jnp.float32)
    if "hidden" in params:
        x = jax.nn.gelu(x @ params["hidden"])
    return x @ params["kernel"]


def router_bce_loss(logits, kept, candidates):
    """Auxiliary BCE that teaches sigmoid(logit) to predict top-k membership, so decoding can route causally.

    All arguments are [recursions, B, T]. Each recursion's loss is averaged over its candidate tokens; the result is
    the sum over recursions.
    """
    per_token = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), kept.astype(jnp.float32))
    return _sum_of_candidate_means(per_token, candidates)


def router_z_loss(logits, candidates):
    """Mean squared router logit over each recursion's candidates, summed over recursions ([recursions, B, T])."""
    return _sum_of_candidate_means(jnp.square(logits.astype(jnp.float32)), candidates)


def _sum_of_candidate_means(values, candidates):
    weights = candidates.astype(jnp.float32)
    per_recursion = jnp.sum(values * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    return jnp.sum(per_recursion)


def token_choice_statistics(logits, probs, depth_index, num_recursions: int) -> dict:
    """Balancing loss, z-loss and load statistics of a token-choice router.

    logits, probs: [B, T, N_r]; depth_index: int [B, T] in 0..N_r-1. The balancing loss is sum_i P_i f_i, with P_i
    the mean router probability of depth i (differentiable) and f_i = N_r times the share of tokens assigned to i
    (constant).
    """
    assigned = jax.nn.one_hot(depth_index, num_recursions, dtype=jnp.float32)  # [B, T, N_r]
    load = jnp.sum(assigned, axis=(0, 1))  # tokens per depth
    share = load / jnp.maximum(jnp.sum(load), 1.0)
    mean_prob = jnp.mean(probs.astype(jnp.float32), axis=(0, 1))
    balance = jnp.sum(mean_prob * jax.lax.stop_gradient(num_recursions * share))
    z_loss = jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))
    entropy = -jnp.mean(jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1))
    max_violation = jnp.max(load) / jnp.maximum(jnp.mean(load), 1e-9) - 1.0
    return {
        "balance_loss": balance,
        "router_z_loss": z_loss,
        "depth_load": load,
        "depth_fraction": share,
        "max_violation": max_violation,
        "router_entropy": entropy,
    }


def loss_free_bias_update(bias, load, rate: float):
    """Apply one step of loss-free balancing: b_i += rate * sign(mean load - load_i)."""
    return bias + rate * jnp.sign(jnp.mean(load) - load)


def straight_through_decision(logits, forced=None):
    """Hard execute (1) or skip (0) decisions with a straight-through gradient, for D-LLM and Leap-of-Thought.

    logits: float [B, T]; a token executes where its logit is >= 0 (sigmoid >= 0.5). The forward value is exactly
    0.0 or 1.0, and the gradient is that of sigmoid(logit). forced: optional bool [B, T] of tokens that execute
    whatever the logit, with no gradient. Returns (executed bool [B, T], decision float32 [B, T]).
    """
    probs = jax.nn.sigmoid(logits.astype(jnp.float32))
    executed = logits >= 0.0
    decision = executed.astype(jnp.float32) + probs - jax.lax.stop_gradient(probs)
    if forced is not None:
        executed = executed | forced
        decision = jnp.where(forced, 1.0, decision)
    return executed, decision


def execution_rate_loss(decisions, target: float):
    """Squared gap between the executed fraction of (token, layer) pairs and its target.

    decisions: float [layers, B, T] from `straight_through_decision`. Returns (loss, executed fraction), both
    scalars; the fraction's forward value is the true share of executed pairs.
    """
    rate = jnp.mean(decisions)
    return jnp.square(rate - target), rate
