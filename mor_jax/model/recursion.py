"""The shared recursion block, scanned over recursions, with expert-choice or token-choice routing (masked path).

Every token runs through the block at every recursion and a mask decides which results count, so this path costs
the compute of the fully unrolled model; it is the exact reference for faster paths.

The recursions are an `nn.scan` whose body (`RecursionStep`) holds the block's layers. Their parameters are broadcast
to every step (`variable_broadcast="params"`): all recursions read one copy. Per-recursion values (router weights,
capacities, which block layer each position applies) are scanned inputs.

Expert-choice, recursion r with kept set S_r (top-k_r router logits among S_{r-1}):

    h[S_r] <- h[S_r] + gate * Block(h[S_r])      gate = alpha * sigmoid(logit)  (or alpha * tanh(logit))

Block includes its residual connections, so a kept token receives (1 + gate) * h + gate * delta. Tokens outside S_r
pass unchanged.

Token-choice, with H1 the block input and depth d(t) chosen by the router once: recursion r runs the tokens with
d(t) > r, ungated (h <- Block(h)), and a token's output after its last recursion is H1 + gate * Block(h).

KV: with recursion-wise caching, attention at recursion r sees only the keys of tokens active at r. With recursive
sharing, every later recursion attends to the keys and values computed at the first recursion (where every token is
active), and only the queries are restricted.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mor_jax.config import ModelConfig
from mor_jax.model.layers import DecoderLayer, causal_mask, decoder_layer_class, kept_key_mask
from mor_jax.model.routing import (
    kept_counts,
    router_bce_loss,
    router_logits,
    router_params,
    router_z_loss,
    token_choice_statistics,
    top_k_indices,
    top_k_mask,
)
from mor_jax.model.sharing import recursion_slots, slots_are_static
from mor_jax.model.capacity import recursion_token_counts


class RecursionStep(nn.Module):
    """One recursion; scanned over recursions by `Recursions`. Holds the block's unique layers.

    carry: dict with h [B, T, D], candidates bool [B, T] (tokens kept at the previous recursion), out [B, T, D]
    (token-choice output) and kv (first-recursion keys and values per block position, for recursive sharing).
    step: dict of per-recursion inputs (index, k, capacity, slots, router weights).
    fixed: values shared by every recursion (positions, and for token-choice H1, gate and depth index).
    """

    config: ModelConfig
    causal_routing: bool = False

    def setup(self):
        layer_class = decoder_layer_class(self.config)
        for i in range(self.config.block_layers):
            setattr(self, f"layer_{i}", layer_class(self.config))

    def layer(self, index: int) -> DecoderLayer:
        return getattr(self, f"layer_{index}")

    def __call__(self, carry, step, fixed):
        cfg = self.config
        h, candidates = carry["h"], carry["candidates"]
        index = step["index"]
        outputs = {}
        if cfg.kind == "recursive":
            active = candidates
            out, kv = self._block(h, active, carry, step, fixed)
            new_h = out
        elif cfg.routing == "expert_choice":
            logits = router_logits(step["router"], h)[..., 0]
            decode_logits = logits
            if cfg.causality == "aux_router":
                decode_logits = router_logits(step["aux_router"], jax.lax.stop_gradient(h))[..., 0]
                outputs["aux_router_logits"] = decode_logits
            if self.causal_routing:
                # A recursion with capacity 1 keeps every candidate, as top-k does.
                active = candidates & ((decode_logits >= 0.0) | (step["capacity"] >= 1.0))
            else:
                active = top_k_mask(jax.lax.stop_gradient(logits), candidates, step["k"])
            out, kv = self._block(h, active, carry, step, fixed)
            if cfg.gating:
                squash = jax.nn.sigmoid if cfg.router_function == "sigmoid" else jnp.tanh
                gate = (cfg.effective_gate_scale * squash(logits))[..., None].astype(h.dtype)
                updated = h + gate * out
            else:
                updated = out
            new_h = jnp.where(active[..., None], updated, h)
            outputs["router_logits"] = logits
        else:  # token-choice: the depth was chosen once, before the first recursion
            active = fixed["depth_index"] >= index
            out, kv = self._block(h, active, carry, step, fixed)
            last = fixed["depth_index"] == index
            final = fixed["block_input"] + fixed["gate"][..., None].astype(h.dtype) * out
            carry = dict(carry, out=jnp.where(last[..., None], final, carry["out"]))
            new_h = jnp.where(active[..., None], out, h)

        new_carry = dict(carry, h=new_h, candidates=active)
        if "kv" in carry:
            new_carry["kv"] = kv
        outputs.update(kept=active, candidates=candidates)
        return new_carry, outputs

    def gathered(self, carry, index: int, size: int, step, fixed):
        """One recursion that computes only `size` tokens per sequence (static), gathered at their positions.

        The same semantics as `__call__`, for the compute-saving path: selected tokens keep their original RoPE
        positions, attend causally among themselves (or to the first recursion's keys with recursive sharing), and
        their new states are written back with a scatter that replaces (never adds) the old state.
        """
        cfg = self.config
        h = carry["h"]
        batch, seq = h.shape[:2]
        positions = fixed["positions"]
        rows = jnp.arange(batch)[:, None]
        outputs = {}
        valid = jnp.ones((batch, size), bool)
        if cfg.kind == "recursive":
            idx = jnp.broadcast_to(jnp.arange(seq, dtype=jnp.int32), (batch, seq))
        elif cfg.routing == "expert_choice":
            logits = router_logits(step["router"], h)[..., 0]
            outputs["router_logits"] = logits
            if cfg.causality == "aux_router":
                outputs["aux_router_logits"] = router_logits(step["aux_router"], jax.lax.stop_gradient(h))[..., 0]
            idx = top_k_indices(jax.lax.stop_gradient(logits), carry["candidates"], size)
        else:
            # Token-choice capacity buffer: the first `size` eligible tokens by position, so a token's place never
            # depends on later tokens. Eligible tokens beyond the buffer stop here (overflow).
            eligible = (fixed["depth_index"] >= index) & carry["alive"]
            rank = jnp.cumsum(eligible.astype(jnp.int32), axis=-1) - 1
            in_buffer = eligible & (rank < size)
            order = jnp.argsort(jnp.where(in_buffer, positions, positions + seq), axis=-1, stable=True)
            idx = order[:, :size].astype(jnp.int32)
            valid = jnp.take_along_axis(in_buffer, idx, axis=-1)
            overflow = eligible & ~in_buffer
            outputs["overflow"] = overflow
        active = jnp.zeros((batch, seq), bool).at[rows, idx].set(valid)

        x = jnp.take_along_axis(h, idx[..., None], axis=1)
        selected_positions = jnp.take_along_axis(positions, idx, axis=1)
        sharing = cfg.kv_strategy == "recursive_sharing"
        shared_kv = carry.get("kv")
        use_shared = sharing and index > 0
        if use_shared:
            mask = positions[:, None, :] <= selected_positions[:, :, None]  # [B, size, T]
        else:
            mask = (selected_positions[:, None, :] <= selected_positions[:, :, None]) & valid[:, None, :]
            mask = mask | jnp.eye(size, dtype=bool)[None]
        if index == 0 and self.is_mutable_collection("params"):
            # Create every layer's parameters on init, including projections that only recursion 0 would use.
            for i in range(cfg.block_layers):
                self.layer(i)(x, selected_positions, mask)
        out = x
        kv_out = []
        for position, layer_index in enumerate(recursion_slots(cfg)[index]):
            layer = self.layer(int(layer_index))
            out, kv = layer(out, selected_positions, mask, kv=shared_kv[position] if use_shared else None)
            kv_out.append(kv)

        if cfg.kind == "mor" and cfg.routing == "expert_choice" and cfg.gating:
            squash = jax.nn.sigmoid if cfg.router_function == "sigmoid" else jnp.tanh
            gate = cfg.effective_gate_scale * squash(jnp.take_along_axis(logits, idx, axis=-1))
            updated = x + gate[..., None].astype(x.dtype) * out
        else:
            updated = out
        new_h = h.at[rows, idx].set(jnp.where(valid[..., None], updated, x))

        new_carry = dict(carry, h=new_h, candidates=active)
        if cfg.kind == "mor" and cfg.routing == "token_choice":
            last = jnp.take_along_axis(fixed["depth_index"], idx, axis=-1) == index
            gate = jnp.take_along_axis(fixed["gate"], idx, axis=-1)[..., None].astype(h.dtype)
            final = jnp.take_along_axis(fixed["block_input"], idx[..., None], axis=1) + gate * out
            previous = jnp.take_along_axis(carry["out"], idx[..., None], axis=1)
            token_out = carry["out"].at[rows, idx].set(jnp.where((valid & last)[..., None], final, previous))
            # A token that overflows keeps the block output of its last completed recursion.
            stopped = fixed["block_input"] + fixed["gate"][..., None].astype(h.dtype) * h
            new_carry["out"] = jnp.where(overflow[..., None], stopped, token_out)
            new_carry["alive"] = carry["alive"] & ~overflow
        if sharing and index == 0:
            new_carry["kv"] = tuple(kv_out)
        outputs.update(kept=active, candidates=carry["candidates"])
        return new_carry, outputs

    def _block(self, h, active, carry, step, fixed):
        """Apply the block's positions in order to all tokens; attention reads the keys of `active` tokens only.

        Returns (output, per-position (keys, values) to carry to the next recursion).
        """
        cfg = self.config
        positions = fixed["positions"]
        mask = kept_key_mask(active)
        shared_kv = carry.get("kv")
        later = step["index"] > 0
        static = slots_are_static(cfg)
        if not static and self.is_mutable_collection("params"):
            for i in range(cfg.block_layers):  # create every layer's parameters on init
                self.layer(i)(h, positions, mask)
        x = h
        kv_out = []
        for position in range(cfg.block_layers):
            shared = None if shared_kv is None else shared_kv[position]
            if static:
                x, kv = _run_layer(self.layer(position), x, positions, mask, shared, later)
            else:
                branches = [_layer_branch(i, later) for i in range(cfg.block_layers)]
                x, kv = nn.switch(step["slots"][position], branches, self, x, positions, mask, shared)
            kv_out.append(kv)
        return x, tuple(kv_out)


def _run_layer(layer, x, positions, mask, shared, later):
    """Run one block layer; with recursive KV sharing, recursions after the first use the carried keys/values."""
    if shared is None:
        return layer(x, positions, mask)
    own_out, own_kv = layer(x, positions, mask)
    # NOTE: the masked path also runs the layer on its own keys and values at later recursions and then picks the
    # shared result, so it saves no compute; it only defines the semantics.
    shared_out, _ = layer(x, positions, causal_mask(x.shape[0], x.shape[1]), kv=shared)
    out = jnp.where(later, shared_out, own_out)
    kv = jax.tree_util.tree_map(lambda a, b: jnp.where(later, a, b), shared, own_kv)
    return out, kv


def _layer_branch(index, later):
    def branch(module, x, positions, mask, shared):
        return _run_layer(module.layer(index), x, positions, mask, shared, later)

    return branch


class Recursions(nn.Module):
    """The shared recursion block applied num_recursions times, with routing as configured.

    Call with h [B, T, D] (the prelude output), positions [B, T] and optionally capacities float [N_r] (traced, for
    capacity warm-up). Returns (h, aux) with aux as documented on `LanguageModel`.
    """

    config: ModelConfig
    causal_routing: bool = False

    @nn.compact
    def __call__(self, h, positions, capacities=None):
        cfg = self.config
        batch, seq = h.shape[:2]
        n = cfg.num_recursions
        # Capacities given per call (warm-up) change k_r, which only the masked path can take as a traced value.
        gathered = cfg.execution == "gathered" and not self.causal_routing and capacities is None
        if capacities is None:
            capacities = jnp.asarray(cfg.capacity_fractions(), jnp.float32)
        step = {
            "index": jnp.arange(n, dtype=jnp.int32),
            "slots": jnp.asarray(recursion_slots(cfg)),
            "capacity": capacities,
            "k": kept_counts(capacities, seq),
        }
        fixed = {"positions": positions}
        carry = {"h": h, "candidates": jnp.ones((batch, seq), bool), "out": jnp.zeros_like(h)}
        aux = {}
        mlp = cfg.router_type == "mlp"
        if cfg.kind == "mor" and cfg.routing == "expert_choice":
            step["router"] = router_params(self, cfg, "router", (n,), 1, mlp)
            if cfg.causality == "aux_router":
                step["aux_router"] = router_params(self, cfg, "aux_router", (n,), 1, False)
        elif cfg.kind == "mor":
            aux.update(self._token_choice_routing(h, fixed, mlp))
        if cfg.kv_strategy == "recursive_sharing":
            kv_shape = (batch, seq, cfg.num_kv_heads, cfg.head_dim)
            zeros = jnp.zeros(kv_shape, h.dtype)
            carry["kv"] = tuple((zeros, zeros) for _ in range(cfg.block_layers))

        if gathered:
            carry, outputs = self._gathered(carry, step, fixed, seq)
        else:
            scan = nn.scan(
                RecursionStep,
                variable_broadcast="params",
                split_rngs={"params": False},
                in_axes=(0, nn.broadcast),
                length=n,
            )
            carry, outputs = scan(cfg, self.causal_routing, name="block")(carry, step, fixed)
        kept = outputs["kept"]
        if "overflow_fraction" in outputs:
            aux["overflow_fraction"] = outputs["overflow_fraction"]
        aux.update(
            kept=kept,
            kept_fraction=jnp.mean(kept.astype(jnp.float32), axis=(1, 2)),
            depth=jnp.sum(kept.astype(jnp.int32), axis=0),
        )
        if cfg.kind == "mor" and cfg.routing == "expert_choice":
            aux.update(self._expert_choice_losses(outputs))
            result = carry["h"]
        elif cfg.kind == "mor":
            result = carry["out"]
        else:
            result = carry["h"]
        return result, aux

    def _gathered(self, carry, step, fixed, seq: int):
        """Unrolled recursions of the compute-saving path; parameters are the same as the scanned path's."""
        cfg = self.config
        block = RecursionStep(cfg, self.causal_routing, name="block")
        sizes = recursion_token_counts(cfg, seq, gathered=True, capacity_factor=cfg.capacity_factor)
        carry = dict(carry, alive=jnp.ones(carry["candidates"].shape, bool))
        if "kv" in carry:
            carry["kv"] = None  # written by the first recursion
        per_recursion = []
        for r in range(cfg.num_recursions):
            inputs = {key: jax.tree_util.tree_map(lambda a: a[r], value)
                      for key, value in step.items() if key in ("router", "aux_router")}
            carry, outputs = block.gathered(carry, r, sizes[r], inputs, fixed)
            per_recursion.append(outputs)
        stacked = jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *per_recursion)
        if "overflow" in stacked:
            stacked["overflow_fraction"] = jnp.mean(jnp.any(stacked.pop("overflow"), axis=0).astype(jnp.float32))
        return carry, stacked

    def _expert_choice_losses(self, outputs) -> dict:
        cfg = self.config
        logits, kept, candidates = outputs["router_logits"], outputs["kept"], outputs["candidates"]
        decode_logits = outputs.get("aux_router_logits", logits)
        bce = router_bce_loss(decode_logits, kept, candidates)
        z_loss = router_z_loss(logits, candidates)
        return {
            "router_logits": decode_logits,
            "router_bce": bce,
            "router_z_loss": z_loss,
            "router_loss": cfg.router_bce_coef * bce + cfg.router_z_loss_coef * z_loss,
        }

    def _token_choice_routing(self, h, fixed, mlp: bool) -> dict:
        cfg = self.config
        n = cfg.num_recursions
        params = router_params(self, cfg, "router", (), n, mlp)
        logits = router_logits(params, h)  # [B, T, N_r]
        probs = jax.nn.softmax(logits, axis=-1)
        scores = probs
        if cfg.balancing == "loss_free":
            bias = self.variable("router_state", "bias", lambda: jnp.zeros((n,), jnp.float32))
            scores = probs + bias.value
        depth_index = jnp.argmax(jax.lax.stop_gradient(scores), axis=-1).astype(jnp.int32)
        gate = cfg.effective_gate_scale * jnp.take_along_axis(probs, depth_index[..., None], axis=-1)[..., 0]
        fixed.update(block_input=h, gate=gate, depth_index=depth_index)
        stats = token_choice_statistics(logits, probs, depth_index, n)
        balance_coef = cfg.balance_loss_coef if cfg.balancing == "loss" else 0.0
        stats["router_loss"] = balance_coef * stats["balance_loss"] + cfg.router_z_loss_coef * stats["router_z_loss"]
        stats["router_logits"] = logits
        return stats
