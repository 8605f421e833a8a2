"""KV caches for decoding: one per unique layer outside the recursions, and per-depth segments inside them.

Layers outside the recursions keep an ordinary cache indexed by token position: keys [rows, max_len, K, Dh]. These
are every layer of the vanilla model, and the prelude and coda of the middle strategies.

The recursion block keeps, per block position, one array [rows, total, K, Dh] split into one segment per recursion
depth:

- recursion-wise caching: the segment of depth r holds the keys and values of the tokens that ran recursion r, in
  the order they arrived (a compacted list, not indexed by position), so attention at depth r reads only them. A
  segment's length is its share of max_len (`depth_fractions`); with the expert-choice capacities 1, 2/3, 1/3 the
  block holds (N_r + 1) / (2 N_r) of what the unrolled layers would. A token whose segment is full stops before
  that recursion (counted as a cache overflow); full-length segments never overflow.
- recursive KV sharing: only the depth-0 segment exists (every token writes it at its first recursion) and every
  later recursion reads it, so the block holds 1 / N_r of the unrolled layers' keys and values.

Segments are laid out deepest first, so a read window of max_len entries starting at any segment stays inside the
array (the depth-0 segment, max_len long, comes last). `entry_positions` records each entry's token position (-1
when empty) and `counts` the entries of every segment.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Sequence

import flax.struct
import jax.numpy as jnp

from mor_jax.config import ConfigError, ModelConfig
from mor_jax.model.layers import dtype_of


@dataclasses.dataclass(frozen=True)
class CacheLayout:
    """Static sizes of one request's cache (in entries)."""

    max_len: int  # tokens a request may hold: prompt plus generated
    num_layers: int  # unique layers outside the recursions that keep a position-indexed cache
    block_layers: int  # block positions, each with its own segmented cache
    lengths: tuple  # entries of the segment of each recursion depth (0: the depth writes nothing)
    offsets: tuple  # first entry of each segment

    @property
    def total(self) -> int:
        """Entries of a block position's cache, over all segments."""
        return sum(self.lengths)


def allocation_fractions(config: ModelConfig, mode: str | Sequence[float] = "full") -> tuple:
    """Share of max_len that each recursion depth's segment holds.

    mode "full": every segment max_len long (decoding never deviates from the full forward pass). "capacity": the
    share of tokens expected at each depth: the expert-choice capacities, (N_r - r) / N_r for token-choice, 1 for the
    router-free recursive model. A sequence gives the fractions directly (the first must be 1).
    """
    n = config.num_recursions
    if isinstance(mode, str):
        if mode == "full" or config.kind == "recursive":
            return (1.0,) * n
        if mode != "capacity":
            raise ConfigError(f"depth cache mode {mode!r} is not one of 'full', 'capacity' or a list of fractions")
        if config.routing == "expert_choice":
            return tuple(config.capacity_fractions())
        return tuple((n - r) / n for r in range(n))
    fractions = tuple(float(f) for f in mode)
    if len(fractions) != n or fractions[0] != 1.0 or not all(0.0 < f <= 1.0 for f in fractions):
        raise ConfigError(f"depth cache fractions {fractions} need {n} values in (0, 1] starting with 1.0")
    return fractions


def make_layout(config: ModelConfig, max_len: int, depth_cache: str | Sequence[float] = "full") -> CacheLayout:
    """Cache layout of a model for requests of up to max_len tokens."""
    if config.kind not in ("vanilla", "recursive", "mor"):
        raise ConfigError(f"KV-cached decoding supports model.kind vanilla, recursive and mor, not {config.kind!r}")
    if max_len < 1 or max_len > config.max_seq_len:
        raise ConfigError(f"max_len={max_len} must be in 1..model.max_seq_len ({config.max_seq_len})")
    if config.kind == "vanilla":
        return CacheLayout(max_len, config.num_layers, 0, (), ())
    n = config.num_recursions
    if config.kv_strategy == "recursive_sharing":
        lengths = (max_len,) + (0,) * (n - 1)
    else:
        lengths = tuple(max_len if r == 0 else min(max_len, math.ceil(f * max_len - 1e-9))
                        for r, f in enumerate(allocation_fractions(config, depth_cache)))
    offsets = tuple(sum(lengths[r + 1:]) for r in range(n))
    return CacheLayout(max_len, 2 * config.recursion_start, config.block_layers, lengths, offsets)


@flax.struct.dataclass
class KVCache:
    """Decoding cache of `rows` requests. Shapes: R rows, S max_len, E layout.total, K kv heads, Dh head_dim."""

    layers: tuple  # per unique outer layer: (keys, values) [R, S, K, Dh]
    block: tuple  # per block position: (keys, values) [R, E, K, Dh]
    entry_positions: jnp.ndarray  # int32 [R, E]: token position of every block entry, -1 where empty
    counts: jnp.ndarray  # int32 [R, N_r]: entries written to each depth segment

    @property
    def nbytes(self) -> int:
        """Bytes the cache arrays occupy."""
        leaves = [a for pair in self.layers + self.block for a in pair] + [self.entry_positions, self.counts]
        return int(sum(a.size * a.dtype.itemsize for a in leaves))


def init_cache(config: ModelConfig, layout: CacheLayout, rows: int) -> KVCache:
    """Create an empty cache for `rows` requests."""
    dtype = dtype_of(config)
    kv = (config.num_kv_heads, config.head_dim)

    def pair(length):
        return (jnp.zeros((rows, length, *kv), dtype), jnp.zeros((rows, length, *kv), dtype))

    return KVCache(
        layers=tuple(pair(layout.max_len) for _ in range(layout.num_layers)),
        block=tuple(pair(layout.total) for _ in range(layout.block_layers)),
        entry_positions=jnp.full((rows, layout.total), -1, jnp.int32),
        counts=jnp.zeros((rows, len(layout.lengths)), jnp.int32),
    )


def entry_bytes(config: ModelConfig) -> int:
    """Bytes of one cached token in one layer (its key and value)."""
    itemsize = jnp.dtype(dtype_of(config)).itemsize
    return 2 * config.num_kv_heads * config.head_dim * itemsize


def vanilla_bytes_per_token(config: ModelConfig) -> int:
    """Key/value bytes per token of a vanilla model with the same unrolled depth."""
    return config.num_layers * entry_bytes(config)


def used_bytes(config: ModelConfig, layout: CacheLayout, lengths, counts) -> dict:
    """Bytes holding real entries, for requests with `lengths` tokens in context and block `counts` [R, N_r].

    Returns totals for the outer layers and the recursion block, next to what the same tokens would take in the
    unrolled layers they stand for (for the ratios that the MoR paper quotes for the recursion block).
    """
    per_entry = entry_bytes(config)
    tokens = int(sum(int(x) for x in lengths))
    outer = layout.num_layers * tokens * per_entry
    block = layout.block_layers * int(sum(int(c) for c in jnp.asarray(counts).reshape(-1))) * per_entry
    unrolled_block = (config.num_layers - layout.num_layers) * tokens * per_entry
    return {"tokens": tokens, "outer_bytes": outer, "block_bytes": block, "unrolled_block_bytes": unrolled_block,
            "total_bytes": outer + block, "vanilla_bytes": tokens * vanilla_bytes_per_token(config)}


def paper_block_ratio(config: ModelConfig) -> Optional[float]:
    """Return the MoR paper's KV memory ratio of the recursion block: (N_r + 1) / (2 N_r) caching, 1 / N_r sharing."""
    if config.kind != "mor":
        return None
    n = config.num_recursions
    return 1.0 / n if config.kv_strategy == "recursive_sharing" else (n + 1) / (2 * n)
