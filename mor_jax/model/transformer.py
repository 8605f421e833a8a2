"""The language models: vanilla Llama-style decoder, and the middle-cycle recursive / MoR models.

Middle-cycle layout for L unrolled layers and N_r recursions:

    embed -> prelude layer -> [block of (L - 2) / N_r distinct layers] x N_r -> coda layer -> final norm -> logits

The recursions are an `nn.scan` whose body holds the block. The block's parameters are broadcast to every step
(`variable_broadcast="params"`), so all recursions use one copy; each recursion's router weights are a row of the
`router` parameter [N_r, D], fed to the scan as a per-step input.

Expert-choice MoR (masked path): every token runs through the block at every recursion, and the kept mask decides which
results count. At recursion r, with kept set S_r (top-k_r router logits among S_{r-1}):

    h[S_r] <- h[S_r] + gate * Block(h[S_r])      gate = gate_scale * sigmoid(router logit)

Block includes its own residual connections, so a kept token receives (1 + gate) * h + gate * delta; tokens outside
S_r pass unchanged, and attention at recursion r only sees keys in S_r (recursion-wise KV caching).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.layers import DecoderLayer, RMSNorm, causal_mask, dtype_of, kept_key_mask, weight_init
from mor_jax.model.routing import router_bce_loss, top_k_mask


class RecursionStep(nn.Module):
    """One recursion of the shared block; scanned over recursions by `Recursions`.

    carry: (h [B, T, D], previously kept bool [B, T]). Per-step inputs: this recursion's router weights [D], its
    token count k and its capacity fraction. Returns the new carry and (router logits, kept, candidates), each [B, T].
    """

    config: ModelConfig
    # Route by sigmoid(logit) >= 0.5 per token (causal, for decoding) instead of by top-k over the sequence.
    causal_routing: bool = False

    @nn.compact
    def __call__(self, carry, router_weights, k, capacity, positions):
        cfg = self.config
        h, candidates = carry
        layers = [DecoderLayer(cfg, name=f"layer_{i}") for i in range(cfg.block_layers)]

        def block(x, mask):
            for layer in layers:
                x = layer(x, positions, mask)
            return x

        if cfg.kind == "recursive":
            out = block(h, causal_mask(h.shape[0], h.shape[1]))
            logits = jnp.zeros(h.shape[:2], jnp.float32)
            return (out, candidates), (logits, candidates, candidates)

        # The router reads the raw (unnormalised) residual stream.
        logits = jnp.einsum("btd,d->bt", h.astype(jnp.float32), router_weights)
        if self.causal_routing:
            # A recursion with capacity 1 keeps every candidate, as top-k does.
            kept = candidates & ((logits >= 0.0) | (capacity >= 1.0))
        else:
            kept = top_k_mask(jax.lax.stop_gradient(logits), candidates, k)
        out = block(h, kept_key_mask(kept))
        if cfg.gating:
            gate = (cfg.gate_scale * jax.nn.sigmoid(logits))[..., None].astype(h.dtype)
            updated = h + gate * out
        else:
            updated = out
        h = jnp.where(kept[..., None], updated, h)
        return (h, kept), (logits, kept, candidates)


class Recursions(nn.Module):
    """The shared recursion block applied num_recursions times, with per-recursion expert-choice routers."""

    config: ModelConfig
    causal_routing: bool = False

    @nn.compact
    def __call__(self, h, positions):
        cfg = self.config
        batch, seq = h.shape[:2]
        if cfg.kind == "mor":
            router = self.param("router", weight_init(cfg, ("recursions", "embed")), (cfg.num_recursions, cfg.d_model))
            counts = jnp.asarray(cfg.kept_counts(seq), jnp.int32)
        else:
            router = jnp.zeros((cfg.num_recursions, cfg.d_model), jnp.float32)
            counts = jnp.full((cfg.num_recursions,), seq, jnp.int32)
        capacities = jnp.asarray(cfg.capacity_fractions(), jnp.float32)

        scan = nn.scan(
            RecursionStep,
            variable_broadcast="params",
            split_rngs={"params": False},
            in_axes=(0, 0, 0, nn.broadcast),
            length=cfg.num_recursions,
        )
        all_tokens = jnp.ones((batch, seq), dtype=bool)
        (h, _), (logits, kept, candidates) = scan(cfg, self.causal_routing, name="block")(
            (h, all_tokens), router, counts, capacities, positions
        )
        aux = {
            "router_logits": logits,  # [N_r, B, T]
            "kept": kept,  # [N_r, B, T]
            "kept_fraction": jnp.mean(kept.astype(jnp.float32), axis=(1, 2)),  # [N_r]
            "depth": jnp.sum(kept.astype(jnp.int32), axis=0),  # [B, T] recursions each token received
        }
        if cfg.kind == "mor":
            aux["router_bce"] = router_bce_loss(logits, kept, candidates)
        return h, aux


class LanguageModel(nn.Module):
    """Decoder-only LM for every `ModelConfig.kind`.

    Call with tokens int [B, T] (and optionally positions int [B, T]). With causal_routing=True, expert-choice
    recursions keep the tokens whose sigmoid(router logit) >= 0.5 instead of the top-k, so no token's routing depends
    on later tokens (the decoding rule). Returns (logits float32 [B, T, vocab], aux).
    aux holds `router_bce` (scalar; 0 without a router), `kept_fraction` [N_r], `depth` [B, T], `router_logits` and
    `kept` [N_r, B, T]. For kind="vanilla", depth is the number of layers and kept_fraction is empty.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, tokens, positions=None, causal_routing: bool = False):
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

        if cfg.kind == "vanilla":
            for i in range(cfg.num_layers):
                h = DecoderLayer(cfg, name=f"layer_{i}")(h, positions, mask)
            aux = {
                "router_bce": jnp.zeros((), jnp.float32),
                "kept_fraction": jnp.zeros((0,), jnp.float32),
                "depth": jnp.full((batch, seq), cfg.num_layers, jnp.int32),
            }
        else:
            h = DecoderLayer(cfg, name="prelude")(h, positions, mask)
            h, aux = Recursions(cfg, causal_routing, name="recursion")(h, positions)
            h = DecoderLayer(cfg, name="coda")(h, positions, mask)
            aux.setdefault("router_bce", jnp.zeros((), jnp.float32))

        h = RMSNorm(cfg, name="final_norm")(h)
        logits = embed.attend(h).astype(jnp.float32)  # tied input/output embedding
        return logits, aux


def build_model(config: ModelConfig) -> LanguageModel:
    """Return the Flax module for a model config (no parameters are created)."""
    return LanguageModel(config)


def init_params(model: LanguageModel, rng, seq_len: int = 8):
    """Initialise parameters (boxed with logical axis names) for a [1, seq_len] input."""
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    return model.init(rng, tokens)["params"]
