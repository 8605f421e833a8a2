"""KV-cached forward pass with causal routing: prefill a prompt, then decode one token at a time.

`forward_cached` runs a chunk of tokens of every row through the model, reading and writing the rows' caches, with
the decoding routing rule of `LanguageModel(..., causal_routing=True)`:

- expert-choice: a token runs recursion r while it ran recursion r - 1 and sigmoid(router_r logit) >= 0.5 (the
  auxiliary router's logit with causality="aux_router"); recursions with capacity 1 keep every token, as top-k does;
- token-choice: a token runs recursions 0 .. d, with d chosen by the router after the prelude;
- the recursive model runs every recursion.

Attention at recursion r reads the depth-r segment of the cache (recursion-wise caching) or the depth-0 segment
(recursive KV sharing); see `mor_jax.inference.cache`. For any prompt, prefill followed by one-token steps gives the
logits of one full forward pass with causal routing (tests/test_inference.py).

When no token of the chunk runs a recursion, `lax.cond` skips that recursion's block entirely, and
`stats["block_calls"]` counts the recursions that ran: a single-token step whose router stops it after recursion
r runs r + 1 blocks, not N_r.

This path serves aligned rows (every row at the same step). The serving engine in `mor_jax.inference.engine` batches
tokens at different depths instead.
"""

from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.inference.cache import CacheLayout, KVCache
from mor_jax.model.layers import DecoderLayer, RMSNorm, dtype_of
from mor_jax.model.routing import router_logits
from mor_jax.model.sharing import recursion_slots


def split_variables(variables: dict) -> tuple[dict, Optional[jnp.ndarray]]:
    """(plain parameter tree, token-choice loss-free bias or None) from model variables (boxed or not)."""
    params = nn.meta.unbox(variables["params"])
    bias = variables.get("router_state", {}).get("recursion", {}).get("bias")
    return params, bias


def apply_layer(config: ModelConfig, params, x, positions, mask, kv=None, cache=None):
    """Apply one decoder layer with the given parameters (see `Attention` for kv and cache)."""
    return DecoderLayer(config).apply({"params": params}, x, positions, mask, kv=kv, cache=cache)


def embed_tokens(config: ModelConfig, params, tokens):
    """Token embeddings [..., D] in the compute dtype (as `nn.Embed` computes them)."""
    embed = nn.Embed(config.vocab_size, config.d_model, dtype=dtype_of(config), param_dtype=jnp.float32)
    return embed.apply({"params": params["embed"]}, tokens)


def output_logits(config: ModelConfig, params, h):
    """Final norm and the tied output projection: float32 logits [..., vocab]."""
    h = RMSNorm(config).apply({"params": params["final_norm"]}, h)
    embed = nn.Embed(config.vocab_size, config.d_model, dtype=dtype_of(config), param_dtype=jnp.float32)
    return embed.apply({"params": params["embed"]}, h, method="attend").astype(jnp.float32)


def router_at(params: dict, name: str, recursion: Optional[int]) -> dict:
    """Return one router's weights from the recursion parameters (recursion=None for the token-choice router)."""
    found = {}
    for part in ("kernel", "hidden"):
        key = f"{name}_{part}"
        if key in params:
            found[part] = params[key] if recursion is None else params[key][recursion]
    return found


def squash(config: ModelConfig, logits):
    return jax.nn.sigmoid(logits) if config.router_function == "sigmoid" else jnp.tanh(logits)


def token_choice_route(config: ModelConfig, rec_params: dict, bias, h):
    """Token-choice routing of states h [..., D]: (depth index int32 [...], gate float32 [...])."""
    probs = jax.nn.softmax(router_logits(router_at(rec_params, "router", None), h), axis=-1)
    scores = probs if bias is None else probs + bias
    depth_index = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    gate = config.effective_gate_scale * jnp.take_along_axis(probs, depth_index[..., None], axis=-1)[..., 0]
    return depth_index, gate


def forward_cached(config: ModelConfig, layout: CacheLayout, params: dict, bias: Any, cache: KVCache, tokens,
                   positions, valid):
    """Run tokens int [B, T] at positions int [B, T] through the model with the cache rows of the B requests.

    valid bool [B, T]: tokens that exist (False for padding, which writes nothing). Each row's earlier tokens must
    already be in its cache, and a row's positions must continue where its cache ends. Returns (logits float32
    [B, T, vocab], new cache, stats) with stats["depth"] int32 [B, T] (recursions each token ran),
    stats["overflow"] bool [B, T] (tokens stopped early by a full depth segment) and stats["block_calls"] int32.
    """
    cfg = config
    batch, seq = tokens.shape
    max_len = layout.max_len
    h = embed_tokens(cfg, params, tokens)
    outer_mask = jnp.arange(max_len)[None, None, :] <= positions[:, :, None]
    outer_slots = jnp.where(valid, positions, max_len)  # max_len: out of range, dropped
    layers = list(cache.layers)

    def outer(index, layer_params, x):
        k, v = layers[index]
        x, layers[index] = apply_layer(cfg, layer_params, x, positions, outer_mask, cache=(k, v, outer_slots))
        return x

    stats = {"depth": jnp.full((batch, seq), cfg.num_layers, jnp.int32), "overflow": jnp.zeros((batch, seq), bool),
             "block_calls": jnp.zeros((), jnp.int32)}
    if cfg.kind == "vanilla":
        for i in range(cfg.num_layers):
            h = outer(i, params[f"layer_{i}"], h)
    else:
        if cfg.recursion_start:
            h = outer(0, params["prelude"], h)
        h, cache, stats = _recursions(cfg, layout, params["recursion"], bias, cache, h, positions, valid)
        if cfg.recursion_start:
            h = outer(1, params["coda"], h)
    cache = cache.replace(layers=tuple(layers))
    return output_logits(cfg, params, h), cache, stats


def _recursions(cfg: ModelConfig, layout: CacheLayout, rec: dict, bias, cache: KVCache, h, positions, valid):
    batch, seq = h.shape[:2]
    total = layout.total
    rows = jnp.arange(batch)[:, None]
    entry = jnp.arange(total)
    slots = recursion_slots(cfg)
    sharing = cfg.kv_strategy == "recursive_sharing"
    capacities = cfg.capacity_fractions()
    block, entry_positions, counts = list(cache.block), cache.entry_positions, cache.counts
    expert = cfg.kind == "mor" and cfg.routing == "expert_choice"
    token_choice = cfg.kind == "mor" and cfg.routing == "token_choice"
    if token_choice:
        depth_index, tc_gate = token_choice_route(cfg, rec, bias, h)
        block_input, tc_out = h, jnp.zeros_like(h)
    candidates = valid
    depth = jnp.zeros((batch, seq), jnp.int32)
    overflow = jnp.zeros((batch, seq), bool)
    calls = jnp.zeros((), jnp.int32)

    for r in range(cfg.num_recursions):
        if expert:
            logits = router_logits(router_at(rec, "router", r), h)[..., 0]
            decide = logits
            if cfg.causality == "aux_router":
                decide = router_logits(router_at(rec, "aux_router", r), h)[..., 0]
            active = candidates if capacities[r] >= 1.0 else candidates & (decide >= 0.0)
        elif token_choice:
            active = candidates & (depth_index >= r)
        else:
            active = candidates
        read_shared = sharing and r > 0
        segment = 0 if read_shared else r
        stopped = jnp.zeros((batch, seq), bool)
        if read_shared:
            write = jnp.full((batch, seq), total, jnp.int32)
        else:
            local = counts[:, r][:, None] + jnp.cumsum(active.astype(jnp.int32), axis=-1) - 1
            stopped = active & (local >= layout.lengths[r])
            overflow = overflow | stopped
            active = active & ~stopped
            write = jnp.where(active, layout.offsets[r] + local, total)
            entry_positions = entry_positions.at[rows, write].set(positions, mode="drop")
        start, stop = layout.offsets[segment], layout.offsets[segment] + layout.lengths[segment]
        in_segment = (entry >= start) & (entry < stop)
        keys_positions = entry_positions[:, None, :]
        mask = in_segment[None, None, :] & (keys_positions >= 0) & (keys_positions <= positions[:, :, None])

        def run(x, caches, r=r, mask=mask, write=write, read_shared=read_shared):
            caches = list(caches)
            for p in range(cfg.block_layers):
                layer_params = rec["block"][f"layer_{int(slots[r][p])}"]
                if read_shared:
                    x, _ = apply_layer(cfg, layer_params, x, positions, mask, kv=caches[p])
                else:
                    x, caches[p] = apply_layer(cfg, layer_params, x, positions, mask,
                                               cache=(caches[p][0], caches[p][1], write))
            return x, tuple(caches)

        def skip(x, caches):
            return x, caches

        out, new_block = jax.lax.cond(jnp.any(active), run, skip, h, tuple(block))
        block = list(new_block)
        calls = calls + jnp.any(active).astype(jnp.int32)
        if expert:
            if cfg.gating:
                gate = (cfg.effective_gate_scale * squash(cfg, logits))[..., None].astype(h.dtype)
                updated = h + gate * out
            else:
                updated = out
            h = jnp.where(active[..., None], updated, h)
        elif token_choice:
            gate = tc_gate[..., None].astype(h.dtype)
            # A token stopped by a full segment keeps the block output of its last completed recursion.
            tc_out = jnp.where(stopped[..., None], block_input + gate * h, tc_out)
            last = active & (depth_index == r)
            tc_out = jnp.where(last[..., None], block_input + gate * out, tc_out)
            h = jnp.where(active[..., None], out, h)
        else:
            h = jnp.where(active[..., None], out, h)
        if not read_shared:
            counts = counts.at[:, r].add(jnp.sum(active, axis=-1, dtype=jnp.int32))
        depth = depth + active.astype(jnp.int32)
        candidates = active

    cache = cache.replace(block=tuple(block), entry_positions=entry_positions, counts=counts)
    stats = {"depth": depth, "overflow": overflow, "block_calls": calls}
    return (tc_out if token_choice else h), cache, stats
