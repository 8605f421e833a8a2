"""Analytic forward FLOPs per sequence, counted the way the MoR paper budgets compute.

Every matmul costs 2 x its multiply-accumulates; attention adds its scores (q k^T) and its weighted values, over the
causal pairs only; norms, activations, softmax and the embedding lookup are not counted. Each recursion is counted
with the number of tokens it actually computes: k_r per sequence for expert-choice, the capacity buffer for
token-choice with gathered execution, and every token for the masked path (which computes them all).

Peer systems. Mixture-of-Depths counts k = max(1, floor(mod_capacity * T)) tokens in each routed layer on the
gathered path and every token on the masked path. D-LLM and Leap-of-Thought compute every token at every layer (their
only path is masked), so with gathered=False they are charged for every token. With gathered=True (the default, and
what `train.flop_budget` uses) they are charged what an implementation that really skips would compute at the
configured target_execution_rate: round(rate * T) tokens per layer, attending causally among themselves. That is an
estimate: the realised rate follows the target only as closely as the rate loss pulls it.

Training FLOPs are taken as 3x forward (backward costs about twice the forward).
"""

from __future__ import annotations

from mor_jax.config import ModelConfig
from mor_jax.model.capacity import recursion_token_counts
from mor_jax.model.mixture_of_depths import mod_kept_count, routed_layers


def _causal_pairs(n: int) -> int:
    """Query-key pairs of causal attention among n tokens."""
    return n * (n + 1) // 2


def layer_flops(config: ModelConfig, queries: int, pairs: int, kv_tokens: int) -> int:
    """Forward FLOPs of one decoder layer.

    queries: tokens whose query, output projection and MLP are computed; pairs: attended (query, key) pairs;
    kv_tokens: tokens whose keys and values are projected (0 when reused from the first recursion).
    """
    d, h, k, dh, f = config.d_model, config.num_heads, config.num_kv_heads, config.head_dim, config.d_ff
    projections = 2 * queries * d * h * dh * 2  # query and output projections
    projections += 2 * kv_tokens * d * k * dh * 2  # key and value projections
    attention = 2 * pairs * h * dh * 2  # scores and weighted values
    mlp = 2 * queries * d * f * 3
    return projections + attention + mlp


def forward_flops(config: ModelConfig, seq_len: int, gathered: bool = True, capacity_factor: float = 1.0) -> int:
    """Forward FLOPs of one sequence of `seq_len` tokens, including the tied output projection."""
    d, v = config.d_model, config.vocab_size
    full_layer = layer_flops(config, seq_len, _causal_pairs(seq_len), seq_len)
    total = 2 * seq_len * d * v  # logits
    if config.kind == "vanilla":
        return total + config.num_layers * full_layer
    if config.kind == "mod":
        return total + _mixture_of_depths_flops(config, seq_len, gathered)
    if config.kind in ("dllm", "lot"):
        return total + _skipping_flops(config, seq_len, gathered)

    total += 2 * config.recursion_start * full_layer  # prelude and coda
    sharing = config.kv_strategy == "recursive_sharing"
    for r, tokens in enumerate(recursion_token_counts(config, seq_len, gathered, capacity_factor)):
        if sharing and r > 0:
            # Queries attend to the first recursion's keys at or before their position: about (T + 1) / 2 keys
            # each when the routed tokens are spread over the sequence (an estimate).
            pairs = tokens * (seq_len + 1) // 2
            kv_tokens = 0
        else:
            pairs, kv_tokens = _causal_pairs(tokens), tokens
        total += config.block_layers * layer_flops(config, tokens, pairs, kv_tokens)
        total += _router_flops(config, tokens if config.routing == "expert_choice" else 0, seq_len, r)
    return total


def _router_token_flops(config: ModelConfig, outputs: int = 1) -> int:
    """Forward FLOPs of one router call on one token (linear, or the MLP of router_type="mlp")."""
    if config.router_type == "mlp":
        width = config.router_mlp_dim or config.d_model
        return 2 * (config.d_model * width + width * outputs)
    return 2 * config.d_model * outputs


def _mixture_of_depths_flops(config: ModelConfig, seq_len: int, gathered: bool) -> int:
    routed = routed_layers(config)
    tokens = mod_kept_count(config, seq_len) if gathered else seq_len
    total = (config.num_layers - len(routed)) * layer_flops(config, seq_len, _causal_pairs(seq_len), seq_len)
    total += len(routed) * layer_flops(config, tokens, _causal_pairs(tokens), tokens)
    router = _router_token_flops(config)
    if config.causality == "aux_router":
        width = config.router_mlp_dim or config.d_model
        router += 2 * (config.d_model * width + width)  # the MLP predictor on stop_gradient(x)
    return total + len(routed) * seq_len * router


def _skipping_flops(config: ModelConfig, seq_len: int, gathered: bool) -> int:
    tokens = round(config.target_execution_rate * seq_len) if gathered else seq_len
    per_layer = layer_flops(config, tokens, _causal_pairs(tokens), tokens)
    if config.kind == "lot":
        # Leap-of-Thought's context key: one more score and one more weighted value per query.
        per_layer += 2 * tokens * config.num_heads * config.head_dim * 2
    per_layer += seq_len * _router_token_flops(config)  # every token's decision
    return config.num_layers * per_layer


def _router_flops(config: ModelConfig, tokens: int, seq_len: int, recursion: int) -> int:
    if config.kind != "mor":
        return 0
    width = config.router_mlp_dim or config.d_model
    if config.routing == "token_choice":
        if recursion:
            return 0  # one router call before the first recursion
        per_token = config.d_model * width + width * config.num_recursions if config.router_type == "mlp" else \
            config.d_model * config.num_recursions
        return 2 * seq_len * per_token
    # Expert-choice scores every candidate: the tokens kept at the previous recursion.
    candidates = seq_len if recursion == 0 else config.kept_counts(seq_len)[recursion - 1]
    per_token = config.d_model * width + width if config.router_type == "mlp" else config.d_model
    if config.causality == "aux_router":
        per_token += config.d_model
    return 2 * candidates * per_token


# Peak dense bfloat16 FLOP/s per chip, from the vendors' published specifications.
PEAK_FLOPS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def peak_flops_per_device(device_kind: str) -> float | None:
    """Peak bfloat16 FLOP/s of a device by its `jax.Device.device_kind`, or None when unknown (e.g. CPU)."""
    for name, peak in PEAK_FLOPS.items():
        if device_kind.startswith(name):
            return peak
    return None
