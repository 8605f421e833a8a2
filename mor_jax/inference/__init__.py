"""Autoregressive inference: KV caches, cached decoding with causal routing, and the serving engine."""

from mor_jax.inference.engine import Completion, Engine, Request, allowed_token_mask, engine_supports, generate
from mor_jax.inference.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Request", "SamplingParams", "allowed_token_mask", "engine_supports", "generate"]
