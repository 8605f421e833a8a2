"""Next-token sampling: greedy, temperature, top-k and top-p, each row with its own settings and seed."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from mor_jax.config import MorJaxError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Sampling settings of one request.

    temperature 0 is greedy decoding. top_k 0 and top_p 1.0 switch those filters off. The seed makes a request's
    samples reproducible whatever other requests share the batch: token n uses fold_in(key(seed), n).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("temperature", "top_p"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), (int, float)):
                raise MorJaxError(f"{name}={getattr(self, name)!r} must be a number")
        for name in ("top_k", "seed"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int):
                raise MorJaxError(f"{name}={getattr(self, name)!r} must be an integer")
        if not 0.0 <= self.temperature < math.inf:
            raise MorJaxError(f"temperature={self.temperature} must be finite and >= 0 (0 is greedy)")
        if self.top_k < 0:
            raise MorJaxError(f"top_k={self.top_k} must be >= 0 (0 keeps every token)")
        if not 0.0 < self.top_p <= 1.0:
            raise MorJaxError(f"top_p={self.top_p} must be in (0, 1] (1 keeps every token)")


def sample_tokens(logits, allowed, key_data, index, temperature, top_k, top_p):
    """Pick one token per row.

    logits float32 [R, V]; allowed bool [V] (tokens that may be produced); key_data uint32 [R, 2] (each row's base
    key, `jax.random.key_data(jax.random.key(seed))`); index int32 [R] (which token of the request this is);
    temperature, top_k, top_p [R]. Returns int32 [R].
    """
    logits = jnp.where(allowed[None, :], logits, -jnp.inf)
    greedy = jnp.argmax(logits, axis=-1)
    scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
    ordered = -jnp.sort(-scaled, axis=-1)  # descending
    vocab = logits.shape[-1]
    kth = jnp.take_along_axis(ordered, jnp.clip(top_k - 1, 0, vocab - 1)[:, None], axis=-1)
    scaled = jnp.where((top_k[:, None] > 0) & (scaled < kth), -jnp.inf, scaled)
    ordered = -jnp.sort(-scaled, axis=-1)
    probs = jax.nn.softmax(ordered, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the higher-ranked tokens
    keep = before < top_p[:, None]  # the top token always stays (before = 0)
    threshold = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    scaled = jnp.where(scaled < threshold, -jnp.inf, scaled)
    keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(key_data), index)
    drawn = jax.vmap(jax.random.categorical)(keys, scaled)
    return jnp.where(temperature > 0.0, drawn, greedy).astype(jnp.int32)
