"""Static token counts of each recursion on the compute-saving (gathered) path."""

from __future__ import annotations

import math

from mor_jax.config import ModelConfig


def token_choice_buffer_sizes(config: ModelConfig, seq_len: int, capacity_factor: float) -> list[int]:
    """Capacity buffer of each token-choice recursion, in tokens per sequence.

    capacity_factor times the share of tokens that reach recursion r under balanced routing ((N_r - r) / N_r of the
    sequence), rounded up, at most seq_len. The first recursion always contains every token.
    """
    n = config.num_recursions
    sizes = []
    for r in range(n):
        expected = (n - r) / n * seq_len
        sizes.append(seq_len if r == 0 else min(seq_len, max(1, math.ceil(capacity_factor * expected - 1e-9))))
    return sizes


def recursion_token_counts(config: ModelConfig, seq_len: int, gathered: bool = True,
                           capacity_factor: float = 1.0) -> list[int]:
    """Tokens per sequence that each recursion computes: k_r (expert-choice), the capacity buffer (token-choice),
    or every token (router-free recursive model, and the masked path)."""
    n = config.num_recursions
    if config.kind == "recursive" or not gathered:
        return [seq_len] * n
    if config.routing == "expert_choice":
        return list(config.kept_counts(seq_len))
    return token_choice_buffer_sizes(config, seq_len, capacity_factor)
