"""Serving engine with early exit and continuous depth-wise batching.

The engine keeps `max_batch` request rows with their KV caches. Every request has one token in flight. One engine
step, compiled once with static shapes:

1. enter lane: up to `lane_size` tokens that just entered (a request's newest token) run the embedding and the
   prelude (every layer for the vanilla model) and, for token-choice, get their depth from the router;
2. every in-flight token runs one recursion of the shared block, each at its own depth: a batch of `max_batch`
   (request, depth) items, all applying the same block weights, each attending to its request's cache segment of
   that depth. A token stops when the next recursion's router sends it no further (expert-choice:
   sigmoid(logit) < 0.5), at its chosen depth (token-choice), after the last recursion, or when its next depth
   segment is full;
3. exit lane: up to `lane_size` stopped tokens run the coda, the output head and sampling; the sampled token enters
   at the next step, or the request finishes (max_new_tokens, EOS, or max_len). Stopped tokens beyond the lane
   wait a step.

The lanes are narrower than the block batch (about max_batch / mean depth tokens finish per step), so the layers
outside the recursions and the output head run about once per generated token rather than once per step and row.
A narrower lane gathers its rows' caches into a copy; a full-width lane works on the caches in place.

A token that exits early frees its item at once: the next token of its request takes the place, and the block
batch stays full of useful work instead of idling until the deepest token of a batch finishes. Requests join as
rows free up: the host prefills a new prompt (`forward_cached` on a padded prompt) and writes it into the free row.

Attention in the block reads the cache in place, masked to the item's depth segment, so every item reads all
segments of its row (the layout's total length). NOTE: on memory-bound hardware this read, not the matmuls, sets
the step time; reading only the item's own segment needs per-depth sub-batches or a paged cache (not done).

The routing is the decoding rule of `mor_jax.inference.decode`, so a greedy request gives the same tokens alone or
among others, and the same as `forward_cached` decoding one token at a time.

The sequence sharing strategies apply different layers at different depths, so their tokens cannot share one
block call; the engine supports the cycle and middle-cycle strategies (the decode path supports all four).
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
from typing import Any, Optional, Sequence

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
from tqdm.auto import tqdm

from mor_jax.config import ConfigError, ModelConfig, MorJaxError
from mor_jax.inference.cache import CacheLayout, KVCache, init_cache, make_layout
from mor_jax.inference.decode import (
    apply_layer,
    embed_tokens,
    forward_cached,
    output_logits,
    router_at,
    split_variables,
    squash,
    token_choice_route,
)
from mor_jax.inference.sampling import SamplingParams, sample_tokens
from mor_jax.model.routing import router_logits
from mor_jax.model.sharing import slots_are_static

IDLE, ENTER, BLOCK, EXIT = 0, 1, 2, 3


@dataclasses.dataclass(frozen=True)
class Request:
    """One generation request: prompt token ids, how many tokens to generate, and how to sample them."""

    prompt: Sequence[int]
    max_new_tokens: int
    sampling: SamplingParams = SamplingParams()
    stop_at_eos: bool = True


@dataclasses.dataclass
class Completion:
    """A finished request: generated token ids (EOS included when it ended the request), the recursion depth of
    the token that produced each of them, and why it stopped ("length", "eos" or "max_len")."""

    index: int
    tokens: list
    depths: list
    finish_reason: str


@flax.struct.dataclass
class EngineState:
    """Device state of all rows (R = max_batch, G = max generated tokens, D = d_model)."""

    cache: KVCache
    token: jnp.ndarray  # int32 [R]: the token in flight
    position: jnp.ndarray  # int32 [R]: its position
    stage: jnp.ndarray  # int32 [R]: IDLE, ENTER (runs the prelude next step) or BLOCK
    depth: jnp.ndarray  # int32 [R]: the recursion the token runs next
    h: jnp.ndarray  # [R, D]: the token's residual stream
    block_input: jnp.ndarray  # [R, D]: its state before the first recursion (token-choice output)
    depth_index: jnp.ndarray  # int32 [R]: token-choice depth (last recursion index)
    gate: jnp.ndarray  # float32 [R]: token-choice gate
    generated: jnp.ndarray  # int32 [R, G]
    generated_depth: jnp.ndarray  # int32 [R, G]
    count: jnp.ndarray  # int32 [R]: tokens generated so far
    max_new: jnp.ndarray  # int32 [R]
    stop_at_eos: jnp.ndarray  # bool [R]
    finish: jnp.ndarray  # int32 [R]: 0 running, 1 length, 2 EOS, 3 max_len
    key: jnp.ndarray  # uint32 [R, 2]: each request's base sampling key
    temperature: jnp.ndarray  # float32 [R]
    top_k: jnp.ndarray  # int32 [R]
    top_p: jnp.ndarray  # float32 [R]
    block_items: jnp.ndarray  # int32: (token, recursion) items the block has run
    overflow: jnp.ndarray  # int32: tokens stopped early by a full cache segment
    clock: jnp.ndarray  # int32: steps taken (rotates which rows the lanes serve first)


FINISH_REASONS = {1: "length", 2: "eos", 3: "max_len"}


class Engine:
    """Continuous depth-wise batching over `max_batch` rows of up to `max_len` tokens each.

    variables: the model's variables ({"params": ..., and "router_state" for loss-free token-choice}).
    allowed_tokens: bool [vocab] of tokens that may be generated (default: all). depth_cache: segment sizes of the
    recursion-wise caches ("full", "capacity" or fractions; see `mor_jax.inference.cache.allocation_fractions`).
    lane_size: tokens per step that run the layers before and after the recursions and the output head (default:
    `default_lane_size`). A token that finished its recursions waits for a free place in that lane.
    """

    def __init__(self, config: ModelConfig, variables: dict, max_batch: int = 32, max_len: int = 512,
                 eos_id: Optional[int] = None, allowed_tokens: Optional[np.ndarray] = None,
                 depth_cache: Any = "full", lane_size: Optional[int] = None):
        if max_batch < 1:
            raise MorJaxError(f"max_batch={max_batch} must be >= 1")
        if config.kind != "vanilla" and not slots_are_static(config):
            raise ConfigError(
                f"the serving engine batches tokens of different depths through one block call, which needs "
                f"model.sharing cycle or middle_cycle, not {config.sharing!r}; decode this model with "
                f"mor_jax.inference.decode.forward_cached instead")
        self.config = config
        self.layout = make_layout(config, max_len, depth_cache)
        self.max_batch = max_batch
        self.max_len = max_len
        self.eos_id = -1 if eos_id is None else int(eos_id)
        self.params, self.bias = split_variables(variables)
        allowed = np.ones((config.vocab_size,), bool) if allowed_tokens is None else np.asarray(allowed_tokens, bool)
        self.allowed = jnp.asarray(allowed)
        self.lane_size = default_lane_size(config, max_batch) if lane_size is None else int(lane_size)
        if not 1 <= self.lane_size <= max_batch:
            raise MorJaxError(f"lane_size={lane_size} must be in 1..max_batch ({max_batch})")
        self._step = jax.jit(functools.partial(_engine_step, config, self.layout, self.eos_id, self.lane_size),
                             donate_argnums=(3,))
        self._prefill = jax.jit(functools.partial(_prefill, config, self.layout))
        self._admit = jax.jit(_admit, donate_argnums=(0,))
        self.state = jax.jit(self._empty_state)()  # jit gives every field its own buffer (for donation)

    def _empty_state(self) -> EngineState:
        cfg, rows, gen = self.config, self.max_batch, self.max_len
        dtype = jnp.float32 if cfg.dtype == "float32" else jnp.bfloat16
        zeros_i = jnp.zeros((rows,), jnp.int32)
        return EngineState(
            cache=init_cache(cfg, self.layout, rows), token=zeros_i, position=zeros_i, stage=zeros_i,
            depth=zeros_i, h=jnp.zeros((rows, cfg.d_model), dtype), block_input=jnp.zeros((rows, cfg.d_model), dtype),
            depth_index=zeros_i, gate=jnp.zeros((rows,), jnp.float32), generated=jnp.zeros((rows, gen), jnp.int32),
            generated_depth=jnp.zeros((rows, gen), jnp.int32), count=zeros_i, max_new=zeros_i,
            stop_at_eos=jnp.zeros((rows,), bool), finish=zeros_i, key=jnp.zeros((rows, 2), jnp.uint32),
            temperature=jnp.zeros((rows,), jnp.float32), top_k=zeros_i, top_p=jnp.ones((rows,), jnp.float32),
            block_items=jnp.zeros((), jnp.int32), overflow=jnp.zeros((), jnp.int32), clock=jnp.zeros((), jnp.int32),
        )

    @property
    def state_bytes(self) -> int:
        """Bytes of the engine's device state (KV caches included)."""
        return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(self.state)))

    def _check(self, index: int, request: Request) -> None:
        length = len(request.prompt)
        if length < 1:
            raise MorJaxError(f"request {index} has an empty prompt; give at least one token (e.g. EOS)")
        if request.max_new_tokens < 1:
            raise MorJaxError(f"request {index}: max_new_tokens={request.max_new_tokens} must be >= 1")
        if length + request.max_new_tokens > self.max_len:
            raise MorJaxError(
                f"request {index}: prompt ({length} tokens) + max_new_tokens ({request.max_new_tokens}) exceeds "
                f"max_len={self.max_len}; shorten the prompt or build the engine with a larger max_len")
        vocab = self.config.vocab_size
        if min(request.prompt) < 0 or max(request.prompt) >= vocab:
            raise MorJaxError(f"request {index}: prompt token ids must be in 0..{vocab - 1}")

    def run(self, requests: Sequence[Request], progress: bool = False) -> list[Completion]:
        """Serve all requests (at most max_batch at a time, joining as rows free up); results in input order."""
        for index, request in enumerate(requests):
            self._check(index, request)
        waiting = collections.deque(enumerate(requests))
        owner: dict[int, int] = {}  # row -> request index
        results: dict[int, Completion] = {}
        bar = tqdm(total=len(requests), desc="requests", disable=not progress)
        while waiting or owner:
            for row in range(self.max_batch):
                if waiting and row not in owner:
                    index, request = waiting.popleft()
                    self._start(row, request)
                    owner[row] = index
            self.state = self._step(self.params, self.bias, self.allowed, self.state)
            finish = np.asarray(self.state.finish)
            done = [row for row in owner if finish[row]]
            if done:
                generated, depths, counts = (np.asarray(a) for a in (self.state.generated,
                                                                      self.state.generated_depth,
                                                                      self.state.count))
                for row in done:
                    n = int(counts[row])
                    results[owner.pop(row)] = Completion(
                        0, generated[row, :n].tolist(), depths[row, :n].tolist(), FINISH_REASONS[int(finish[row])])
                    self.state = self.state.replace(finish=self.state.finish.at[row].set(0))
                bar.update(len(done))
        bar.close()
        return [dataclasses.replace(results[i], index=i) for i in range(len(requests))]

    def _start(self, row: int, request: Request) -> None:
        length = len(request.prompt)
        bucket = min(self.max_len, max(16, 1 << (length - 1).bit_length()))
        prompt = np.zeros((1, bucket), np.int32)
        prompt[0, :length] = request.prompt
        s = request.sampling
        key = jax.random.key_data(jax.random.key(s.seed))
        settings = (jnp.int32(request.max_new_tokens), jnp.bool_(request.stop_at_eos), key,
                    jnp.float32(s.temperature), jnp.int32(s.top_k), jnp.float32(s.top_p))
        row_state = self._prefill(self.params, self.bias, self.allowed, jnp.asarray(prompt), jnp.int32(length),
                                  settings, self.eos_id)
        self.state = self._admit(self.state, row_state, jnp.int32(row))


def _prefill(config: ModelConfig, layout: CacheLayout, params, bias, allowed, prompt, length, settings, eos_id):
    """Run a padded prompt [1, P] through a fresh one-row cache and sample the first new token."""
    max_new, stop_at_eos, key, temperature, top_k, top_p = settings
    bucket = prompt.shape[1]
    positions = jnp.arange(bucket, dtype=jnp.int32)[None]
    valid = positions < length
    cache = init_cache(config, layout, 1)
    logits, cache, stats = forward_cached(config, layout, params, bias, cache, prompt, positions, valid)
    last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)
    token = sample_tokens(last[None], allowed, key[None], jnp.zeros((1,), jnp.int32), temperature[None],
                          top_k[None], top_p[None])[0]
    depth = jax.lax.dynamic_index_in_dim(stats["depth"][0], length - 1, keepdims=False)
    finish = _finish_code(jnp.int32(1), max_new, stop_at_eos & (token == eos_id), length + 1 > layout.max_len)
    return dict(cache=cache, token=token, position=length, depth=depth, finish=finish, settings=settings)


def _finish_code(count, max_new, eos, full):
    return jnp.where(eos, 2, jnp.where(count >= max_new, 1, jnp.where(full, 3, 0))).astype(jnp.int32)


def _admit(state: EngineState, row_state: dict, row):
    """Write a prefilled request into `row` of the engine state."""
    max_new, stop_at_eos, key, temperature, top_k, top_p = row_state["settings"]

    def put(full, part):
        return jax.lax.dynamic_update_slice_in_dim(full, part.astype(full.dtype), row, axis=0)

    cache = jax.tree_util.tree_map(put, state.cache, row_state["cache"])
    finish = row_state["finish"]
    return state.replace(
        cache=cache,
        token=state.token.at[row].set(row_state["token"]),
        position=state.position.at[row].set(row_state["position"]),
        stage=state.stage.at[row].set(jnp.where(finish > 0, IDLE, ENTER)),
        depth=state.depth.at[row].set(0),
        generated=state.generated.at[row].set(0).at[row, 0].set(row_state["token"]),
        generated_depth=state.generated_depth.at[row].set(0).at[row, 0].set(row_state["depth"]),
        count=state.count.at[row].set(1),
        max_new=state.max_new.at[row].set(max_new),
        stop_at_eos=state.stop_at_eos.at[row].set(stop_at_eos),
        finish=state.finish.at[row].set(finish),
        key=state.key.at[row].set(key),
        temperature=state.temperature.at[row].set(temperature),
        top_k=state.top_k.at[row].set(top_k),
        top_p=state.top_p.at[row].set(top_p),
    )


def default_lane_size(config: ModelConfig, max_batch: int) -> int:
    """Enter/exit lane width: 1.25 x the tokens expected to finish per step (max_batch / mean depth), plus one.

    The mean depth is the sum of the expert-choice capacities, (N_r + 1) / 2 for balanced token-choice and N_r for
    the recursive model. The vanilla model finishes every token at every step.
    """
    if config.kind == "vanilla":
        return max_batch
    n = config.num_recursions
    if config.kind == "recursive":
        depth = float(n)
    elif config.routing == "expert_choice":
        depth = sum(config.capacity_fractions())
    else:
        depth = (n + 1) / 2
    return min(max_batch, math.ceil(1.25 * max_batch / depth) + 1)


def _pick(wanted, size: int, clock):
    """Up to `size` rows where `wanted` is True, in an order that rotates with `clock` (no row waits forever).

    Returns (rows int32 [size], valid bool [size]).
    """
    count = wanted.shape[0]
    if size == count:  # every row: no gather needed
        return jnp.arange(count, dtype=jnp.int32), wanted
    priority = (jnp.arange(count) - clock) % count
    order = jnp.argsort(jnp.where(wanted, priority, count + priority))[:size].astype(jnp.int32)
    return order, wanted[order]


def _lane_layer(cfg: ModelConfig, layer_params, pair, x, rows, valid, positions, max_len: int):
    """Run an outer layer for the lane's rows (x [E, 1, D]); write each valid row's new key/value at its position."""
    keys, values = pair
    slots = jnp.where(valid, positions, max_len)[:, None]
    mask = (jnp.arange(max_len)[None, :] <= positions[:, None])[:, None, :]
    if rows.shape[0] == keys.shape[0]:  # a full-width lane is every row in order: write in place
        return apply_layer(cfg, layer_params, x, positions[:, None], mask, cache=(keys, values, slots))
    x, (new_keys, new_values) = apply_layer(cfg, layer_params, x, positions[:, None], mask,
                                            cache=(keys[rows], values[rows], slots))
    lane = jnp.arange(rows.shape[0])
    target = jnp.where(valid, rows, keys.shape[0])  # out of range: dropped
    return x, (keys.at[target, positions].set(new_keys[lane, positions], mode="drop"),
               values.at[target, positions].set(new_values[lane, positions], mode="drop"))


def _engine_step(config: ModelConfig, layout: CacheLayout, eos_id: int, lane: int, params, bias, allowed,
                 state: EngineState):
    """Run one engine step: enter lane, one recursion for every in-flight token, exit lane (module docstring)."""
    cfg = config
    max_len = layout.max_len
    layers = list(state.cache.layers)

    # Enter lane: embedding and the layers before the recursions, for up to `lane` new tokens.
    rows, valid = _pick(state.stage == ENTER, lane, state.clock)
    positions = state.position[rows]
    x = embed_tokens(cfg, params, state.token[rows][:, None])  # [E, 1, D]
    outer = [f"layer_{i}" for i in range(cfg.num_layers)] if cfg.kind == "vanilla" else \
        ["prelude"] * cfg.recursion_start
    for index, name in enumerate(outer):
        x, layers[index] = _lane_layer(cfg, params[name], layers[index], x, rows, valid, positions, max_len)
    target = jnp.where(valid, rows, state.token.shape[0])
    entered = jnp.zeros(state.stage.shape, bool).at[target].set(True, mode="drop")
    x = jnp.zeros_like(state.h).at[target].set(x[:, 0], mode="drop")
    state = state.replace(cache=state.cache.replace(layers=tuple(layers)))
    if cfg.kind == "vanilla":
        state = state.replace(h=jnp.where(entered[:, None], x, state.h),
                              depth=jnp.where(entered, cfg.num_layers, state.depth),
                              stage=jnp.where(entered, EXIT, state.stage))
    else:
        state = _enter(cfg, params["recursion"], bias, state, entered, x)
        state = _block_step(cfg, layout, params["recursion"], state)

    # Exit lane: the layers after the recursions, the output head and sampling.
    rows, valid = _pick(state.stage == EXIT, lane, state.clock)
    positions = state.position[rows]
    x = state.h[rows][:, None]
    if cfg.kind != "vanilla" and cfg.recursion_start:
        x, layers[1] = _lane_layer(cfg, params["coda"], layers[1], x, rows, valid, positions, max_len)
    logits = output_logits(cfg, params, x[:, 0])
    count = state.count[rows]
    token = sample_tokens(logits, allowed, state.key[rows], count, state.temperature[rows], state.top_k[rows],
                          state.top_p[rows])
    finish = _finish_code(count + 1, state.max_new[rows], state.stop_at_eos[rows] & (token == eos_id),
                          positions + 2 > max_len)
    done = finish > 0
    target = jnp.where(valid, rows, state.token.shape[0])
    return state.replace(
        cache=state.cache.replace(layers=tuple(layers)),
        generated=state.generated.at[target, count].set(token, mode="drop"),
        generated_depth=state.generated_depth.at[target, count].set(state.depth[rows], mode="drop"),
        count=state.count.at[target].set(count + 1, mode="drop"),
        finish=state.finish.at[target].set(finish, mode="drop"),
        token=state.token.at[target].set(token, mode="drop"),
        position=state.position.at[target].set(jnp.where(done, positions, positions + 1), mode="drop"),
        stage=state.stage.at[target].set(jnp.where(done, IDLE, ENTER), mode="drop"),
        clock=state.clock + 1,
    )


def _enter(cfg: ModelConfig, rec: dict, bias, state: EngineState, enter, x):
    """Start the recursions of the tokens that just ran the prelude."""
    updates = dict(h=jnp.where(enter[:, None], x, state.h), depth=jnp.where(enter, 0, state.depth),
                   stage=jnp.where(enter, BLOCK, state.stage))
    if cfg.kind == "mor" and cfg.routing == "token_choice":
        depth_index, gate = token_choice_route(cfg, rec, bias, x)
        updates.update(block_input=jnp.where(enter[:, None], x, state.block_input),
                       depth_index=jnp.where(enter, depth_index, state.depth_index),
                       gate=jnp.where(enter, gate, state.gate))
    return state.replace(**updates)


def _stacked_router_logits(rec: dict, name: str, h):
    """Logits of every recursion's expert-choice router for states h [R, D]: float32 [N_r, R]."""
    params = router_at(rec, name, None)
    return jax.vmap(lambda p: router_logits(p, h)[..., 0])(params)


def _block_step(cfg: ModelConfig, layout: CacheLayout, rec: dict, state: EngineState):
    """Run one recursion for every in-flight token at its own depth; tokens that stop move to the EXIT stage."""
    rows = state.token.shape[0]
    n, max_len = cfg.num_recursions, layout.max_len
    row_index = jnp.arange(rows)
    in_block = state.stage == BLOCK
    depth = jnp.minimum(state.depth, n - 1)
    sharing = cfg.kv_strategy == "recursive_sharing"
    offsets = jnp.asarray(layout.offsets, jnp.int32)
    lengths = jnp.asarray(layout.lengths, jnp.int32)
    counts = state.cache.counts

    segment = jnp.where(depth > 0, 0, depth) if sharing else depth
    writes = in_block & ((depth == 0) | (not sharing))
    local = counts[row_index, segment]  # entries already in the segment
    total = layout.total
    # Attention reads the token's segment in place (no gathered copy): entries from the segment's start up to and
    # including the token's own new entry.
    start = offsets[segment][:, None]
    entry = jnp.arange(total)[None, :]
    mask = ((entry >= start) & (entry < start + local[:, None] + writes[:, None]))[:, None, :]  # [R, 1, E]
    write_entry = jnp.where(writes, offsets[segment] + local, total)[:, None]  # total: dropped

    x = state.h[:, None]
    positions = state.position[:, None]
    block = list(state.cache.block)
    for p in range(cfg.block_layers):
        keys, values = block[p]
        x, block[p] = apply_layer(cfg, rec["block"][f"layer_{p}"], x, positions, mask,
                                  cache=(keys, values, write_entry))
    out = x[:, 0]
    h = state.h
    entry_positions = state.cache.entry_positions.at[row_index, write_entry[:, 0]].set(state.position, mode="drop")
    counts = counts.at[row_index, segment].add(writes.astype(jnp.int32))

    expert = cfg.kind == "mor" and cfg.routing == "expert_choice"
    token_choice = cfg.kind == "mor" and cfg.routing == "token_choice"
    if expert:
        logits = jnp.take_along_axis(_stacked_router_logits(rec, "router", h), depth[None], axis=0)[0]
        if cfg.gating:
            gate = (cfg.effective_gate_scale * squash(cfg, logits))[:, None].astype(h.dtype)
            new_h = h + gate * out
        else:
            new_h = out
    else:
        new_h = out
    new_h = jnp.where(in_block[:, None], new_h, h)
    next_depth = state.depth + in_block.astype(jnp.int32)

    more = next_depth < n
    nxt = jnp.minimum(next_depth, n - 1)
    if expert:
        name = "aux_router" if cfg.causality == "aux_router" else "router"
        decide = jnp.take_along_axis(_stacked_router_logits(rec, name, new_h), nxt[None], axis=0)[0]
        full_capacity = jnp.asarray([c >= 1.0 for c in cfg.capacity_fractions()])[nxt]
        wants = full_capacity | (decide >= 0.0)
    elif token_choice:
        wants = next_depth <= state.depth_index
    else:
        wants = jnp.ones((rows,), bool)
    room = jnp.ones((rows,), bool) if sharing else counts[row_index, nxt] < lengths[nxt]
    go_on = in_block & more & wants
    stopped = go_on & ~room
    go_on = go_on & room
    exiting = in_block & ~go_on
    if token_choice:
        # The token's output after its last recursion: H1 + gate * Block(h).
        final = state.block_input + state.gate[:, None].astype(h.dtype) * out
        new_h = jnp.where(exiting[:, None], final, new_h)
    cache = state.cache.replace(block=tuple(block), entry_positions=entry_positions, counts=counts)
    return state.replace(
        cache=cache, h=new_h, depth=next_depth, stage=jnp.where(exiting, EXIT, state.stage),
        block_items=state.block_items + jnp.sum(in_block, dtype=jnp.int32),
        overflow=state.overflow + jnp.sum(stopped, dtype=jnp.int32),
    )


def allowed_token_mask(tokenizer, vocab_size: int) -> np.ndarray:
    """Tokens a model may generate: the tokenizer's ids except padding (the embedding table may have more rows)."""
    allowed = np.zeros((vocab_size,), bool)
    allowed[: tokenizer.vocab_size] = True
    allowed[tokenizer.pad_id] = False
    return allowed


def engine_supports(config: ModelConfig) -> bool:
    """Return whether the serving engine can run this model (vanilla, recursive or MoR with cycle-style sharing)."""
    if config.kind == "vanilla":
        return True
    return config.kind in ("recursive", "mor") and slots_are_static(config)


def generate(config: ModelConfig, variables: dict, tokenizer, prompts: Sequence[str], max_new_tokens: int = 200,
             sampling: SamplingParams = SamplingParams(), max_batch: int = 32, max_len: Optional[int] = None,
             progress: bool = False) -> list[str]:
    """Generate a continuation for every prompt (strings in, strings out) with the serving engine.

    Every prompt starts a new document (EOS first, as in training); generation stops at EOS or max_new_tokens.
    Request i samples with seed sampling.seed + i. max_len defaults to the longest prompt plus max_new_tokens.
    Models the engine cannot serve (the peer kinds, the sequence sharing strategies) are decoded one prompt at a
    time by recomputing the whole context with the decoding routing rule for every new token: the same tokens,
    much slower.
    """
    if isinstance(prompts, (str, bytes)) or not all(isinstance(p, str) for p in prompts):
        raise MorJaxError("prompts must be a list of strings; wrap a single prompt as [prompt]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise MorJaxError(f"max_new_tokens={max_new_tokens!r} must be an integer >= 1")
    encoded = [[tokenizer.eos_id] + [int(t) for t in tokenizer.encode(p)] for p in prompts]
    if not encoded:
        return []
    needed = max(len(e) for e in encoded) + max_new_tokens
    if max_len is None and needed > config.max_seq_len:
        raise MorJaxError(
            f"the longest prompt ({needed - max_new_tokens} tokens with the leading EOS) plus max_new_tokens "
            f"({max_new_tokens}) exceeds model.max_seq_len={config.max_seq_len}; shorten it or ask for fewer tokens")
    max_len = max_len or needed
    allowed = allowed_token_mask(tokenizer, config.vocab_size)
    requests = [Request(e, max_new_tokens, dataclasses.replace(sampling, seed=sampling.seed + i))
                for i, e in enumerate(encoded)]
    if engine_supports(config):
        engine = Engine(config, variables, max_batch=min(max_batch, len(prompts)), max_len=max_len,
                        eos_id=tokenizer.eos_id, allowed_tokens=allowed)
        completions = [c.tokens for c in engine.run(requests, progress=progress)]
    else:
        next_token = _recompute_step(config, allowed)  # compiled once, shared by all requests
        completions = [_recompute_decode(next_token, variables, r, max_len, tokenizer.eos_id)
                       for r in tqdm(requests, desc="requests", disable=not progress)]
    texts = []
    for tokens in completions:
        tokens = [t for t in tokens if t != tokenizer.eos_id]
        texts.append(tokenizer.decode(np.asarray(tokens, np.int32)))
    return texts


def _recompute_step(config: ModelConfig, allowed: np.ndarray):
    """Compile the no-cache decoding step: the full model on a padded context, then sampling at `length - 1`."""
    from mor_jax.model import build_model

    model = build_model(config)
    allowed = jnp.asarray(allowed)

    @jax.jit
    def next_token(variables, context, length, index, key, temperature, top_k, top_p):
        logits, _ = model.apply(variables, context, causal_routing=True)
        last = jax.lax.dynamic_index_in_dim(logits[0], length - 1, keepdims=False)
        return sample_tokens(last[None], allowed, key[None], index[None], temperature[None], top_k[None],
                             top_p[None])[0]

    return next_token


def _recompute_decode(next_token, variables: dict, request: Request, max_len: int, eos_id: int) -> list:
    """Decode one request by running the full model on its whole context for every token (no cache)."""
    s = request.sampling
    settings = (jax.random.key_data(jax.random.key(s.seed)), jnp.float32(s.temperature), jnp.int32(s.top_k),
                jnp.float32(s.top_p))
    context = np.zeros((1, max_len), np.int32)
    context[0, : len(request.prompt)] = request.prompt
    length, tokens = len(request.prompt), []
    while len(tokens) < request.max_new_tokens:
        token = int(next_token(variables, jnp.asarray(context), jnp.int32(length), jnp.int32(len(tokens)), *settings))
        tokens.append(token)
        if (request.stop_at_eos and token == eos_id) or length >= max_len:
            break
        context[0, length] = token
        length += 1
    return tokens
