"""The residual branch of a decoder layer and the attention mask of token-skipping layers.

Mixture-of-Depths and D-LLM scale or switch off what a layer adds to the residual stream, so they need that branch
alone: f(x) = attn(norm(x)) + mlp(norm(x + attn(norm(x)))), which makes DecoderLayer(x) = x + f(x).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.layers import MLP, REMAT_POLICIES, Attention, RMSNorm, causal_mask


class ResidualBranch(nn.Module):
    """f(x) of a pre-norm decoder layer; its parameters have the names and shapes of `DecoderLayer`'s.

    x: [B, T, D]; positions: int [B, T]; mask: bool [B, T, T] (query t may attend to key s). Returns [B, T, D].
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask):
        attended, _ = Attention(self.config, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, mask
        )
        mixed = MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(x + attended))
        return attended + mixed


def remat_class(config: ModelConfig, module_class: type[nn.Module]) -> type[nn.Module]:
    """Return `module_class`, wrapped in flax.linen.remat with the policy of config.remat unless it is "none"."""
    if config.remat == "none":
        return module_class
    return nn.remat(module_class, policy=REMAT_POLICIES[config.remat])


def executed_key_mask(executed):
    """Causal mask over the keys of executed tokens, plus each token's own key.

    executed: bool [B, T]. An executed query attends to the executed keys at or before it. A skipped query gets the
    same keys plus its own, which is the output it would have had if it executed: the straight-through gradient of
    D-LLM and Leap-of-Thought needs that output, and the diagonal keeps every softmax row finite.
    """
    batch, seq = executed.shape
    own = jnp.eye(seq, dtype=bool)[None]
    return causal_mask(batch, seq) & (executed[:, None, :] | own)
