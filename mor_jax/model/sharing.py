"""Parameter-sharing strategies: which unique layer each unrolled layer uses.

For L unrolled layers and N_r recursions:

    cycle            l mod (L / N_r)                    L=9, N_r=3: 0 1 2 0 1 2 0 1 2
    sequence         l // N_r                                       0 0 0 1 1 1 2 2 2
    middle_cycle     first and last unique, middle layers 1 + ((l - 1) mod ((L - 2) / N_r))
    middle_sequence  first and last unique, middle layers 1 + (l - 1) // N_r

The layers between the unique first and last ones (all layers for cycle and sequence) are split into N_r
consecutive recursions of equal length; the router decides which tokens run each recursion. With the cycle
strategies every recursion applies the same layers in the same order. With the sequence strategies recursion r
applies the unique layers that the map assigns to its positions, so consecutive recursions may use different
layers (for L=9: recursion 0 applies layer 0 three times, recursion 1 layer 1, recursion 2 layer 2).
"""

from __future__ import annotations

import numpy as np

from mor_jax.config import ConfigError, ModelConfig


def unique_layer(strategy: str, layer: int, num_layers: int, num_recursions: int) -> int:
    """Index of the unique layer that unrolled layer `layer` uses (prelude = 0 for the middle strategies)."""
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer {layer} is outside 0..{num_layers - 1}")
    if strategy == "cycle":
        return layer % (num_layers // num_recursions)
    if strategy == "sequence":
        return layer // num_recursions
    middle = num_layers - 2
    if strategy == "middle_cycle":
        if layer in (0, num_layers - 1):
            return 0 if layer == 0 else middle // num_recursions + 1
        return 1 + (layer - 1) % (middle // num_recursions)
    if strategy == "middle_sequence":
        if layer in (0, num_layers - 1):
            return 0 if layer == 0 else middle // num_recursions + 1
        return 1 + (layer - 1) // num_recursions
    raise ConfigError(f"unknown sharing strategy {strategy!r}; valid: cycle, sequence, middle_cycle, middle_sequence")


def layer_map(strategy: str, num_layers: int, num_recursions: int) -> list[int]:
    """Unique-layer index of every unrolled layer."""
    return [unique_layer(strategy, l, num_layers, num_recursions) for l in range(num_layers)]


def recursion_slots(config: ModelConfig) -> np.ndarray:
    """Block-layer index used at each position of each recursion: int32 [N_r, block_layers].

    Indices count from 0 within the recursion block (the prelude, if any, is not part of it).
    """
    mapping = layer_map(config.sharing, config.num_layers, config.num_recursions)
    start, size = config.recursion_start, config.block_layers
    slots = np.asarray(
        [[mapping[start + r * size + j] - start for j in range(size)] for r in range(config.num_recursions)],
        np.int32,
    )
    return slots


def slots_are_static(config: ModelConfig) -> bool:
    """True when every recursion applies block layers 0, 1, ... in order (the cycle strategies)."""
    slots = recursion_slots(config)
    return bool(np.all(slots == np.arange(config.block_layers)[None, :]))
