"""Llama-style decoder layer: RMSNorm, RoPE, grouped-query attention, SwiGLU MLP.

Every parameter carries logical axis names (`embed`, `heads`, `kv_heads`, `kv`, `mlp`, `vocab`, `norm`); the mesh
rules in `MeshConfig.rules` map them to mesh axes. Shapes use: B batch, T seq, D embed, H heads, K kv heads,
Dh head_dim, F mlp.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig


def dtype_of(config: ModelConfig):
    return jnp.bfloat16 if config.dtype == "bfloat16" else jnp.float32


def weight_init(config: ModelConfig, axes: tuple):
    return nn.with_logical_partitioning(nn.initializers.normal(stddev=config.init_std), axes)


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32; the output is cast back to the compute dtype."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)), (x.shape[-1],))
        x32 = x.astype(jnp.float32)
        inv_rms = jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.config.norm_eps)
        return (x32 * inv_rms * scale).astype(dtype_of(self.config))


def apply_rope(x, positions, theta: float):
    """Rotate query or key heads by their absolute positions.

    x: [B, T, heads, Dh]; positions: int [B, T] (the tokens' original positions, also after a gather).
    """
    head_dim = x.shape[-1]
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (jnp.arange(half, dtype=jnp.float32) / half))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, half]
    sin = jnp.sin(angles)[:, :, None, :]
    cos = jnp.cos(angles)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., :half], x32[..., half:]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)


class Attention(nn.Module):
    """Grouped-query self-attention with RoPE and an explicit boolean mask.

    mask: bool [B, T, S], True where query t may attend to key s. Every row must allow at least one key (callers
    keep the diagonal), so no softmax row is fully masked. With `kv` given ([B, S, K, Dh] keys, already
    rotated, and values), the layer attends to those instead of projecting its own input (recursive KV sharing).
    With `cache` given as (keys [B, S, K, Dh], values, slots int [B, T]), the layer writes its new keys and values
    into the cache at `slots` (slots outside 0..S-1 are dropped, so a token can write nothing) and attends to the
    whole cache; `mask` is then [B, T, S] over cache entries (KV-cached decoding).
    Returns (output [B, T, D], (keys, values) that were attended to: the updated cache when one is given).
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, cache=None):
        cfg = self.config
        dtype = dtype_of(cfg)
        heads, kv_heads, head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim

        def projection(name, features, axes):
            return nn.DenseGeneral(
                features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                kernel_init=weight_init(cfg, axes), name=name,
            )

        q = projection("query", (heads, head_dim), ("embed", "heads", "kv"))(x)  # [B, T, H, Dh]
        q = apply_rope(q, positions, cfg.rope_theta)
        if kv is None:
            k = projection("key", (kv_heads, head_dim), ("embed", "kv_heads", "kv"))(x)  # [B, S, K, Dh]
            v = projection("value", (kv_heads, head_dim), ("embed", "kv_heads", "kv"))(x)
            k = apply_rope(k, positions, cfg.rope_theta)
            if cache is not None:
                cache_k, cache_v, slots = cache
                rows = jnp.arange(x.shape[0])[:, None]
                k = cache_k.at[rows, slots].set(k.astype(cache_k.dtype), mode="drop")
                v = cache_v.at[rows, slots].set(v.astype(cache_v.dtype), mode="drop")
        else:
            k, v = kv

        batch, seq = x.shape[0], x.shape[1]
        group = heads // kv_heads
        q = q.reshape(batch, seq, kv_heads, group, head_dim)
        scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / jnp.sqrt(head_dim).astype(jnp.float32)
        scores = jnp.where(mask[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(dtype)
        out = jnp.einsum("bkgts,bskd->btkgd", probs, v).reshape(batch, seq, heads, head_dim)
        out = nn.DenseGeneral(
            cfg.d_model, axis=(-2, -1), use_bias=False, dtype=dtype, param_dtype=jnp.float32,
            kernel_init=weight_init(cfg, ("heads", "kv", "embed")), name="out",
        )(out)
        return out, (k, v)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    config: ModelConfig

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        dtype = dtype_of(cfg)

        def dense(name, features, axes):
            return nn.Dense(features, use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                            kernel_init=weight_init(cfg, axes), name=name)

        hidden = nn.silu(dense("gate", cfg.d_ff, ("embed", "mlp"))(x)) * dense("up", cfg.d_ff, ("embed", "mlp"))(x)
        return dense("down", cfg.d_model, ("mlp", "embed"))(hidden)


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer including both residual connections: x + attn(norm(x)), then + mlp(norm(.)).

    Returns (output, (keys, values)) so recursive KV sharing can keep the first recursion's keys and values.
    """

    config: ModelConfig

    @nn.compact
    def __call__(self, x, positions, mask, kv=None, cache=None):
        attended, kv = Attention(self.config, name="attention")(
            RMSNorm(self.config, name="attention_norm")(x), positions, mask, kv, cache
        )
        h = x + attended
        return h + MLP(self.config, name="mlp")(RMSNorm(self.config, name="mlp_norm")(h)), kv


# Policies of jax.checkpoint for ModelConfig.remat; "none" applies no remat.
REMAT_POLICIES = {
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def decoder_layer_class(config: ModelConfig) -> type[DecoderLayer]:
    """Return DecoderLayer, wrapped in flax.linen.remat with the policy of config.remat unless it is "none".

    The wrapped class creates the same parameters under the same names.
    """
    if config.remat == "none":
        return DecoderLayer
    return nn.remat(DecoderLayer, policy=REMAT_POLICIES[config.remat])


def causal_mask(batch: int, seq: int):
    """bool [B, T, T]: query t may attend to keys s <= t."""
    mask = jnp.tril(jnp.ones((seq, seq), dtype=bool))
    return jnp.broadcast_to(mask, (batch, seq, seq))


def kept_key_mask(kept):
    """Causal mask restricted to kept keys, plus each token's own diagonal.

    kept: bool [B, T]. A kept query attends only to earlier kept keys (recursion-wise KV caching). An unkept query
    attends only to itself: its output is discarded, and the diagonal keeps its softmax row finite.
    """
    batch, seq = kept.shape
    mask = causal_mask(batch, seq) & kept[:, None, :]
    return mask | jnp.eye(seq, dtype=bool)[None]
