"""Expert-choice token selection and the router's auxiliary loss.

Recursion r keeps k_r tokens of each sequence: the top-k_r router logits among the tokens kept at recursion r - 1
(hierarchical filtering). Ties are broken towards the earlier position.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


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


def router_bce_loss(logits, kept, candidates):
    """Auxiliary BCE that teaches sigmoid(logit) to predict top-k membership, so decoding can route causally.

    All arguments are [recursions, B, T]. Each recursion's loss is averaged over its candidate tokens; the result is
    the sum over recursions.
    """
    per_token = optax.sigmoid_binary_cross_entropy(logits.astype(jnp.float32), kept.astype(jnp.float32))
    weights = candidates.astype(jnp.float32)
    per_recursion = jnp.sum(per_token * weights, axis=(1, 2)) / jnp.maximum(jnp.sum(weights, axis=(1, 2)), 1.0)
    return jnp.sum(per_recursion)
