"""Validation over a fixed list of batches: loss, bits per byte, perplexity and routing statistics."""

from __future__ import annotations

import math

import jax
import numpy as np


def process_rows(batch: np.ndarray) -> np.ndarray:
    """Return this process's contiguous share of the rows of a global batch that every process has in full.

    Without the split, each process would contribute the whole batch and the global array would repeat it once per
    process.
    """
    count, index = jax.process_count(), jax.process_index()
    if count == 1:
        return batch
    if len(batch) % count:
        raise ValueError(f"a batch of {len(batch)} rows does not split evenly over {count} processes")
    rows = len(batch) // count
    return batch[index * rows:(index + 1) * rows]


def evaluate_batches(eval_step, variables, batches, batch_sharding, max_batches: int = 0) -> dict:
    """Run a jitted eval step over `batches` (numpy [B, T + 1] each) and aggregate exactly.

    Returns val_loss (nats per token), val_bits_per_byte, perplexity, mean_depth (recursions per token; layers for
    vanilla). Recursive models add kept_fraction_per_recursion and dead_token_ratio (share of tokens that received
    at most one recursion). Expert-choice adds sampling_accuracy_per_recursion (agreement of the decoding rule,
    sigmoid(logit) >= 0.5, with top-k membership among the recursion's candidates); token-choice adds
    depth_fraction, max_violation (max load / mean load - 1) and router_entropy (nats).
    """
    if max_batches:
        batches = batches[:max_batches]
    totals = None
    for batch in batches:
        array = jax.make_array_from_process_local_data(batch_sharding, process_rows(batch))
        stats = jax.device_get(eval_step(variables, array))
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
        "val_tokens": int(tokens),
    }
    if "kept" in totals:
        result["kept_fraction_per_recursion"] = [float(k) / tokens for k in totals["kept"]]
        result["dead_token_ratio"] = float(totals["dead"]) / tokens
    if "agreement" in totals:
        result["sampling_accuracy_per_recursion"] = [
            float(a) / max(float(c), 1.0) for a, c in zip(totals["agreement"], totals["candidates"])
        ]
    if "depth_load" in totals:
        load = np.asarray(totals["depth_load"], np.float64)
        result["depth_fraction"] = (load / max(load.sum(), 1.0)).tolist()
        result["max_violation"] = float(load.max() / max(load.mean(), 1e-9) - 1.0)
        result["router_entropy"] = float(totals["entropy"]) / tokens
    return result
