"""Validation over a fixed list of batches: loss, bits per byte, perplexity and routing statistics."""

from __future__ import annotations

import math

import jax
import numpy as np


def evaluate_batches(eval_step, params, batches, batch_sharding, max_batches: int = 0) -> dict:
    """Run a jitted eval step over `batches` (numpy [B, T + 1] each) and aggregate exactly.

    Returns val_loss (nats per token), val_bits_per_byte, perplexity, mean_depth (recursions per token; layers for
    vanilla), kept_fraction_per_recursion and sampling_accuracy_per_recursion (agreement of sigmoid(logit) >= 0.5
    with top-k membership among the recursion's candidates). Lists are empty for models without a router.
    """
    if max_batches:
        batches = batches[:max_batches]
    totals = None
    for batch in batches:
        array = jax.make_array_from_process_local_data(batch_sharding, batch)
        stats = jax.device_get(eval_step(params, array))
        totals = stats if totals is None else jax.tree_util.tree_map(np.add, totals, stats)
    if totals is None:
        raise ValueError("no validation batches to evaluate")
    tokens = float(totals["tokens"])
    val_loss = float(totals["nll"]) / tokens
    result = {
        "val_loss": val_loss,
        "val_bits_per_byte": float(totals["nll"]) / math.log(2.0) / float(totals["bytes"]),
        "perplexity": math.exp(min(val_loss, 700.0)),
        "mean_depth": float(totals["depth"]) / tokens,
        "kept_fraction_per_recursion": [],
        "sampling_accuracy_per_recursion": [],
        "val_tokens": int(tokens),
    }
    if "kept" in totals:
        result["kept_fraction_per_recursion"] = [float(k) / tokens for k in totals["kept"]]
        result["sampling_accuracy_per_recursion"] = [
            float(a) / max(float(c), 1.0) for a, c in zip(totals["agreement"], totals["candidates"])
        ]
    return result
