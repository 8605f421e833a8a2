"""The language models: a vanilla Llama-style decoder, recursive / Mixture-of-Recursions models and the peer systems
(Mixture-of-Depths, D-LLM, Leap-of-Thought).

Layout of the recursive models for L unrolled layers and N_r recursions (middle strategies shown):

    embed -> prelude layer -> [recursion block of (L - 2) / N_r layers] x N_r -> coda layer -> final norm -> logits

The cycle and sequence strategies have no prelude or coda: the recursions cover all L layers. Routing, sharing and
the KV strategies are described in `mor_jax.model.recursion` and `mor_jax.model.sharing`.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.layers import RMSNorm, causal_mask, decoder_layer_class, dtype_of, weight_init
from mor_jax.model.dllm import DLLM
from mor_jax.model.leap_of_thought import LeapOfThought
from mor_jax.model.mixture_of_depths import MixtureOfDepths
from mor_jax.model.recursion import Recursions


class LanguageModel(nn.Module):
    """Decoder-only LM for every `ModelConfig.kind`.

    Call with tokens int [B, T] and optionally:
    - positions int [B, T] (default 0..T-1);
    - causal_routing: expert-choice recursions keep the tokens that the decoding router sends on
      (sigmoid(logit) >= 0.5, or the auxiliary router's logit >= 0) instead of the top-k, so no token's depth
      depends on later tokens (the decoding rule);
    - capacities float [N_r]: expert-choice capacities for this call (capacity warm-up).

    Returns (logits float32 [B, T, vocab], aux). aux always contains `router_loss` (the weighted sum of the router's
    auxiliary losses, added to the LM loss), `kept_fraction` [N_r] and `depth` [B, T] (recursions each token
    received; the layer count for vanilla). Recursive models add `kept` [N_r, B, T]; expert-choice adds
    `router_logits` [N_r, B, T] (the logits that decoding routes by), `router_bce` and `router_z_loss`; token-choice
    adds `router_logits` [B, T, N_r], `balance_loss`, `router_z_loss`, `depth_load`, `depth_fraction`,
    `max_violation` and `router_entropy`.

    The peer systems (`mod`, `dllm`, `lot`, see their modules) fill `kept` [decisions, B, T] with one row per
    routed layer (Mixture-of-Depths) or per layer (D-LLM, Leap-of-Thought), and `depth` with the layers each token
    executed. Mixture-of-Depths adds `router_logits` (the logits decoding routes by), `router_bce` and
    `router_z_loss`, and routes by logit > 0 with causal_routing; D-LLM and Leap-of-Thought add `router_logits`,
    `execution_rate` and `rate_loss`, and are causal without causal_routing.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, causal_routing: bool = False, capacities=None):
        cfg = self.config
        batch, seq = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        embed = nn.Embed(
            cfg.vocab_size, cfg.d_model, dtype=dtype_of(cfg), param_dtype=jnp.float32,
            embedding_init=weight_init(cfg, ("vocab", "embed")), name="embed",
        )
        h = embed(tokens)
        mask = causal_mask(batch, seq)
        layer_class = decoder_layer_class(cfg)

        if cfg.kind == "vanilla":
            for i in range(cfg.num_layers):
                h, _ = layer_class(cfg, name=f"layer_{i}")(h, positions, mask)
            aux = {
                "kept_fraction": jnp.zeros((0,), jnp.float32),
                "depth": jnp.full((batch, seq), cfg.num_layers, jnp.int32),
            }
        elif cfg.kind == "mod":
            h, aux = MixtureOfDepths(cfg, causal_routing, name="mod")(h, positions)
        elif cfg.kind == "dllm":
            h, aux = DLLM(cfg, name="dllm")(h, positions)
        elif cfg.kind == "lot":
            h, aux = LeapOfThought(cfg, name="lot")(h, positions)
        else:
            if cfg.recursion_start:
                h, _ = layer_class(cfg, name="prelude")(h, positions, mask)
            h, aux = Recursions(cfg, causal_routing, name="recursion")(h, positions, capacities)
            if cfg.recursion_start:
                h, _ = layer_class(cfg, name="coda")(h, positions, mask)
        aux.setdefault("router_loss", jnp.zeros((), jnp.float32))

        h = RMSNorm(cfg, name="final_norm")(h)
        logits = embed.attend(h).astype(jnp.float32)  # tied input/output embedding
        return logits, aux


def build_model(config: ModelConfig) -> LanguageModel:
    """Return the Flax module for a model config (no parameters are created)."""
    return LanguageModel(config)


def init_variables(model: LanguageModel, rng, seq_len: int = 8) -> dict:
    """Initialise all variables ("params", and "router_state" for loss-free balancing) for a [1, seq_len] input.

    Parameters are boxed with their logical axis names.
    """
    return dict(model.init(rng, jnp.zeros((1, seq_len), jnp.int32)))


def init_params(model: LanguageModel, rng, seq_len: int = 8):
    """Initialise parameters (boxed with logical axis names) for a [1, seq_len] input."""
    return init_variables(model, rng, seq_len)["params"]
