"""KV-cached decoding and the serving engine against one full forward pass with causal routing."""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ConfigError, ModelConfig, MorJaxError
from mor_jax.data import ByteTokenizer
from mor_jax.inference import Engine, Request, SamplingParams, generate
from mor_jax.inference.cache import init_cache, make_layout, paper_block_ratio, used_bytes, vanilla_bytes_per_token
from mor_jax.inference.decode import forward_cached, split_variables
from mor_jax.inference.engine import _recompute_decode, _recompute_step
from mor_jax.inference.sampling import sample_tokens
from mor_jax.model import build_model, init_variables

TINY = ModelConfig(kind="mor", num_layers=8, num_recursions=3, vocab_size=384, d_model=32, num_heads=4,
                   num_kv_heads=2, head_dim=8, d_ff=64, max_seq_len=64)
# Float32 on CPU. The cache contains the same keys and values as the full pass, in another order (compacted depth
# segments), so sums run in another order: a few ulps of difference, and 1e-5 leaves room for nothing more.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)
MAX_LEN = 24
SEQ = 12
PROMPT = 5

CASES = {
    "vanilla": dict(kind="vanilla"),
    "recursive": dict(kind="recursive"),
    "recursive_sharing": dict(kind="recursive", kv_strategy="recursive_sharing"),
    "expert": dict(),
    "expert_sharing": dict(kv_strategy="recursive_sharing"),
    "expert_aux_router": dict(causality="aux_router"),
    "expert_sequence": dict(sharing="sequence", num_layers=6),
    "token": dict(routing="token_choice"),
    "token_sharing": dict(routing="token_choice", kv_strategy="recursive_sharing"),
    "token_loss_free": dict(routing="token_choice", balancing="loss_free"),
}


def model_case(name):
    return _model_case(name)


@functools.lru_cache(maxsize=None)
def _model_case(name):
    """(config, variables) with routers scaled up so their decisions are far from the threshold."""
    config = dataclasses.replace(TINY, **CASES[name])
    variables = nn.unbox(init_variables(build_model(config), jax.random.key(0)))
    recursion = variables["params"].get("recursion", {})
    for key in list(recursion):
        if key.startswith(("router", "aux_router")):
            # An untrained router's logits are ~1e-3; rounding could flip a decision at that size.
            recursion[key] = recursion[key] * 60.0
    if "router_state" in variables:
        variables["router_state"]["recursion"]["bias"] = jnp.asarray([0.0, 0.05, -0.05], jnp.float32)
    return config, variables


@functools.lru_cache(maxsize=None)
def cached_forward(name):
    config, _ = model_case(name)
    layout = make_layout(config, MAX_LEN)
    return layout, jax.jit(functools.partial(forward_cached, config, layout))


@functools.lru_cache(maxsize=None)
def decoded(name):
    """Full forward pass, one cached chunk, and prefill + one-token steps, on two rows of SEQ tokens."""
    config, variables = model_case(name)
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, 258)
    full_logits, aux = jax.jit(functools.partial(build_model(config).apply, causal_routing=True))(variables, tokens)
    layout, forward = cached_forward(name)
    params, bias = split_variables(variables)
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    everything = jnp.ones((2, SEQ), bool)
    chunk_logits, _, chunk_stats = forward(params, bias, init_cache(config, layout, 2), tokens, positions, everything)
    # The prompt is prefilled as a padded chunk of the same shape (padding must write nothing).
    logits, cache, _ = forward(params, bias, init_cache(config, layout, 2), tokens, positions, positions < PROMPT)
    logits = logits[:, :PROMPT]
    step_logits, step_stats = [logits], []
    for t in range(PROMPT, SEQ):
        logits, cache, stats = forward(params, bias, cache, tokens[:, t:t + 1], positions[:, t:t + 1],
                                       everything[:, t:t + 1])
        step_logits.append(logits)
        step_stats.append(stats)
    return dict(full=full_logits, aux=aux, chunk=chunk_logits, chunk_stats=chunk_stats,
                steps=jnp.concatenate(step_logits, axis=1), step_stats=step_stats, cache=cache)


@pytest.mark.parametrize("name", list(CASES))
def test_cached_decoding_matches_full_forward(name):
    result = decoded(name)
    np.testing.assert_allclose(result["chunk"], result["full"], **TOLERANCE)
    np.testing.assert_allclose(result["steps"], result["full"], **TOLERANCE)


@pytest.mark.parametrize("name", ["recursive", "expert", "expert_aux_router", "token", "token_sharing"])
def test_cached_depths_match_full_forward(name):
    result = decoded(name)
    np.testing.assert_array_equal(result["chunk_stats"]["depth"], result["aux"]["depth"])
    step_depths = np.concatenate([np.asarray(s["depth"]) for s in result["step_stats"]], axis=1)
    np.testing.assert_array_equal(step_depths, result["aux"]["depth"][:, PROMPT:])


def test_routing_is_not_trivial_in_the_cases():
    # Guards the tests above: expert-choice and token-choice must give the tokens different depths.
    for name in ("expert", "token"):
        depths = np.asarray(decoded(name)["aux"]["depth"])
        assert len(np.unique(depths)) >= 2, name


def test_recursion_wise_cache_holds_exactly_the_routed_tokens():
    result = decoded("expert")
    kept = np.asarray(result["aux"]["kept"])  # [N_r, B, T]
    np.testing.assert_array_equal(np.asarray(result["cache"].counts), kept.sum(axis=2).T)


def test_single_token_step_skips_recursions_the_router_stops():
    config, variables = model_case("expert")
    layout, forward = cached_forward("expert")
    params, bias = split_variables(variables)
    tokens = jax.random.randint(jax.random.key(1), (1, SEQ), 0, 258)
    full_depths = np.asarray(jax.jit(functools.partial(build_model(config).apply, causal_routing=True))(
        variables, tokens)[1]["depth"])[0]
    cache = init_cache(config, layout, 1)
    calls = []
    for t in range(SEQ):
        _, cache, stats = forward(params, bias, cache, tokens[:, t:t + 1], jnp.full((1, 1), t, jnp.int32),
                                  jnp.ones((1, 1), bool))
        calls.append(int(stats["block_calls"]))
    np.testing.assert_array_equal(calls, full_depths)
    assert min(calls) < config.num_recursions  # some token really stopped early


def test_token_choice_router_bias_changes_depths():
    # The loss-free balancing bias takes part in decoding: removing it changes some token's depth.
    config, variables = model_case("token_loss_free")
    layout, forward = cached_forward("token_loss_free")
    params, bias = split_variables(variables)
    tokens = jax.random.randint(jax.random.key(1), (2, SEQ), 0, 258)
    positions = jnp.broadcast_to(jnp.arange(SEQ, dtype=jnp.int32), (2, SEQ))
    run = functools.partial(forward, params, cache=init_cache(config, layout, 2), tokens=tokens,
                            positions=positions, valid=jnp.ones((2, SEQ), bool))
    with_bias = run(bias=bias)[2]["depth"]
    shifted = run(bias=jnp.asarray([0.0, 1.0, -1.0]))[2]["depth"]
    assert not np.array_equal(with_bias, shifted)


# --- cache sizes ---------------------------------------------------------------------------------------------

def test_cache_allocation_matches_the_paper_ratios():
    for n in (2, 3, 4):
        config = dataclasses.replace(TINY, num_layers=2 + 3 * n, num_recursions=n, max_seq_len=600)
        layout = make_layout(config, 600, "capacity")
        # Block entries per token of context, against the N_r x block_layers unrolled layers they replace.
        assert layout.total / (n * 600) == pytest.approx((n + 1) / (2 * n), abs=1e-3)
        shared = make_layout(dataclasses.replace(config, kv_strategy="recursive_sharing"), 600)
        assert shared.total / (n * 600) == pytest.approx(1 / n)
        assert paper_block_ratio(config) == pytest.approx((n + 1) / (2 * n))


def test_used_bytes_count_routed_entries():
    config, _ = model_case("expert")
    result = decoded("expert")
    layout, _ = cached_forward("expert")
    used = used_bytes(config, layout, [SEQ, SEQ], result["cache"].counts)
    kept_entries = int(np.asarray(result["aux"]["kept"]).sum())
    per_entry = 2 * config.num_kv_heads * config.head_dim * 4
    assert used["block_bytes"] == kept_entries * config.block_layers * per_entry
    assert used["vanilla_bytes"] == 2 * SEQ * vanilla_bytes_per_token(config)
    assert used["total_bytes"] < used["vanilla_bytes"]


# --- serving engine ------------------------------------------------------------------------------------------

def engine_requests(count=5, seed=0):
    rng = np.random.default_rng(seed)
    return [Request(rng.integers(0, 258, size=int(rng.integers(2, 9))).tolist(), int(rng.integers(3, 12)),
                    stop_at_eos=False) for _ in range(count)]


@functools.lru_cache(maxsize=None)
def engine(name, max_batch, depth_cache="full", lane_size=None):
    config, variables = model_case(name)
    return Engine(config, variables, max_batch=max_batch, max_len=MAX_LEN, depth_cache=depth_cache,
                  lane_size=lane_size)


def reference_greedy(name, request):
    """Greedy tokens and depths by prefill + one-token steps of forward_cached."""
    config, variables = model_case(name)
    layout, forward = cached_forward(name)
    params, bias = split_variables(variables)
    length = len(request.prompt)
    prompt = jnp.asarray([request.prompt + [0] * (SEQ - length)], jnp.int32)  # padded: one compiled shape
    positions = jnp.arange(SEQ, dtype=jnp.int32)[None]
    logits, cache, stats = forward(params, bias, init_cache(config, layout, 1), prompt, positions,
                                   positions < length)
    tokens, depths = [], [int(stats["depth"][0, length - 1])]
    logits = logits[:, :length]
    for i in range(request.max_new_tokens):
        tokens.append(int(jnp.argmax(logits[0, -1])))
        if i + 1 == request.max_new_tokens:
            break
        position = jnp.full((1, 1), length + i, jnp.int32)
        logits, cache, stats = forward(params, bias, cache, jnp.asarray([[tokens[-1]]]), position,
                                       jnp.ones((1, 1), bool))
        depths.append(int(stats["depth"][0, 0]))
    return tokens, depths


@pytest.mark.parametrize("name", ["vanilla", "expert", "expert_sharing", "token"])
def test_engine_matches_reference_decoding(name):
    requests = engine_requests()
    completions = engine(name, 3).run(requests)
    for request, completion in zip(requests, completions):
        assert (completion.tokens, completion.depths) == reference_greedy(name, request)
        assert completion.finish_reason == "length"


@pytest.mark.parametrize("name", ["expert", "token"])
def test_engine_text_alone_equals_batched(name):
    requests = engine_requests(count=6, seed=3)
    # A one-token lane: tokens that finish their recursions together wait for the output head in turn.
    together = engine(name, 3, lane_size=1).run(requests)
    alone = [engine(name, 1).run([request])[0] for request in requests[:3]]
    for a, b in zip(alone, together[:3]):
        assert a.tokens == b.tokens


def test_engine_block_items_follow_depths():
    eng = engine("expert", 4)
    before = int(eng.state.block_items)
    completions = eng.run(engine_requests(count=4, seed=5))
    items = int(eng.state.block_items) - before
    depths = [d for c in completions for d in c.depths]
    # Each decoded token ran its depth in block items; the prompt's last token ran in the prefill instead. Tokens
    # that stop early keep the items below tokens x N_r.
    decoded_depths = sum(sum(c.depths[1:]) for c in completions)
    assert items == decoded_depths
    assert items < len(depths) * TINY.num_recursions
    assert len(set(depths)) >= 2


def test_engine_overflowing_depth_segments_stop_tokens_early():
    eng = engine("recursive", 2, depth_cache=(1.0, 0.25, 0.25))
    completions = eng.run(engine_requests(count=2, seed=7))
    assert int(eng.state.overflow) > 0
    assert min(d for c in completions for d in c.depths[1:]) < TINY.num_recursions
    assert [len(c.tokens) for c in completions] == [r.max_new_tokens for r in engine_requests(count=2, seed=7)]


def test_engine_stops_at_eos():
    name = "expert"
    request = engine_requests(count=1)[0]
    tokens, _ = reference_greedy(name, request)
    eos = tokens[2]
    config, variables = model_case(name)
    eng = Engine(config, variables, max_batch=2, max_len=MAX_LEN, eos_id=eos)
    completion = eng.run([dataclasses.replace(request, stop_at_eos=True)])[0]
    assert completion.tokens == tokens[: tokens.index(eos) + 1]
    assert completion.finish_reason == "eos"


def test_engine_rejects_bad_requests_and_configs():
    eng = engine("expert", 1)
    with pytest.raises(MorJaxError, match="max_len"):
        eng.run([Request([1] * 20, 10)])
    with pytest.raises(MorJaxError, match="empty prompt"):
        eng.run([Request([], 3)])
    with pytest.raises(MorJaxError, match="0..383"):
        eng.run([Request([400], 3)])
    config, variables = model_case("expert_sequence")
    with pytest.raises(ConfigError, match="middle_cycle"):
        Engine(config, variables, max_len=MAX_LEN)
    with pytest.raises(ConfigError, match="max_seq_len"):
        Engine(*model_case("expert"), max_len=1000)


def test_generate_returns_text_for_every_prompt():
    config, variables = model_case("expert")
    texts = generate(config, variables, ByteTokenizer(), ["ab", "hello"], max_new_tokens=5, max_batch=2,
                     sampling=SamplingParams(temperature=1.0, seed=4))
    assert len(texts) == 2 and all(isinstance(t, str) for t in texts)
    again = generate(config, variables, ByteTokenizer(), ["ab", "hello"], max_new_tokens=5, max_batch=1,
                     sampling=SamplingParams(temperature=1.0, seed=4))
    assert texts == again  # seeded per request, whatever the batch


def test_generate_recomputes_for_models_the_engine_cannot_serve():
    # Sequence sharing applies different layers per depth, so the engine rejects it and generate recomputes.
    name = "expert_sequence"
    config, variables = model_case(name)
    request = engine_requests(count=1, seed=9)[0]
    next_token = _recompute_step(config, np.ones(config.vocab_size, bool))
    tokens = _recompute_decode(next_token, variables, request, MAX_LEN, -1)
    assert tokens == reference_greedy(name, request)[0]
    mod = dataclasses.replace(TINY, kind="mod", num_layers=4)
    mod_variables = nn.unbox(init_variables(build_model(mod), jax.random.key(0)))
    texts = generate(mod, mod_variables, ByteTokenizer(), ["ab"], max_new_tokens=3)
    assert len(texts) == 1


def test_generate_rejects_bad_arguments():
    config, variables = model_case("expert")
    with pytest.raises(MorJaxError, match="list of strings"):
        generate(config, variables, ByteTokenizer(), "ROMEO.", max_new_tokens=3)
    with pytest.raises(MorJaxError, match="max_new_tokens"):
        generate(config, variables, ByteTokenizer(), ["a"], max_new_tokens=2.5)


# --- sampling ------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def sampler():
    return jax.jit(sample_tokens)


def draw(logits, temperature=1.0, top_k=0, top_p=1.0, seed=0, index=0, allowed=None):
    rows = logits.shape[0]
    allowed = np.ones(logits.shape[1], bool) if allowed is None else allowed
    keys = jnp.stack([jax.random.key_data(jax.random.key(seed + i)) for i in range(rows)])
    return np.asarray(sampler()(jnp.asarray(logits, jnp.float32), jnp.asarray(allowed), keys,
                                jnp.full((rows,), index, jnp.int32), jnp.full((rows,), temperature, jnp.float32),
                                jnp.full((rows,), top_k, jnp.int32), jnp.full((rows,), top_p, jnp.float32)))


def test_sampling_filters():
    logits = np.log(np.asarray([[0.5, 0.3, 0.15, 0.05]] * 64))
    greedy = draw(logits, temperature=0.0)
    assert set(greedy) == {0}
    assert set(draw(logits, top_k=1)) == {0}
    assert set(draw(logits, top_k=2)) == {0, 1}
    assert set(draw(logits, top_p=0.7)) == {0, 1}  # 0.5 < 0.7, and 0.5 + 0.3 reaches it
    assert set(draw(logits, top_p=0.4)) == {0}
    assert set(draw(logits)) == {0, 1, 2, 3}
    allowed = np.asarray([False, True, True, True])
    assert 0 not in set(draw(logits, allowed=allowed))


def test_sampling_is_seeded_per_row():
    logits = np.zeros((8, 50))
    first = draw(logits, seed=1)
    assert np.array_equal(first, draw(logits, seed=1))
    assert not np.array_equal(first, draw(logits, seed=1, index=1))
    with pytest.raises(MorJaxError, match="temperature"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(MorJaxError, match="top_p"):
        SamplingParams(top_p=0.0)
    with pytest.raises(MorJaxError, match="finite"):
        SamplingParams(temperature=float("inf"))
    with pytest.raises(MorJaxError, match="seed"):
        SamplingParams(seed=None)
    with pytest.raises(MorJaxError, match="top_k"):
        SamplingParams(top_k=2.5)
