"""Peer systems: Mixture-of-Depths, D-LLM and Leap-of-Thought (routing invariants, update rules, causality, FLOPs)."""

import dataclasses
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mor_jax.config import ConfigError, ModelConfig, load_config
from mor_jax.model import build_model, init_params
from mor_jax.model import dllm
from mor_jax.model.leap_of_thought import SummaryAttention
from mor_jax.model.mixture_of_depths import mod_kept_count, routed_layers
from mor_jax.model.residual_branch import ResidualBranch
from mor_jax.training.flops import forward_flops

PAPER = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "paper")
BATCH, SEQ = 2, 32
BASE = ModelConfig(
    kind="mod", num_layers=4, vocab_size=384, d_model=32, num_heads=4, num_kv_heads=2, head_dim=8, d_ff=64,
)


def config(**changes) -> ModelConfig:
    if changes.get("kind") in ("dllm", "lot"):
        changes.setdefault("execution", "masked")
    return dataclasses.replace(BASE, **changes)


def tokens(seed=1, seq=SEQ):
    return jax.random.randint(jax.random.key(seed), (BATCH, seq), 0, 258)


@functools.lru_cache(maxsize=None)
def model_and_params(model_config: ModelConfig):
    model = build_model(model_config)
    return model, nn.unbox(init_params(model, jax.random.key(0)))


@functools.lru_cache(maxsize=None)
def jitted_apply(model_config: ModelConfig, causal_routing: bool = False):
    model = build_model(model_config)
    return jax.jit(lambda params, batch: model.apply({"params": params}, batch, causal_routing=causal_routing))


def run(model_config: ModelConfig, batch, params=None, causal_routing: bool = False):
    if params is None:
        params = model_and_params(model_config)[1]
    return jitted_apply(model_config, causal_routing)(params, batch)


def set_router_kernels(params, value: float):
    """Return params with every layer's router kernel filled with `value` (0.0 makes every logit 0, so every token
    executes)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full_like(leaf, value) if "router_kernel" in jax.tree_util.keystr(path) else leaf,
        params,
    )


# Mixture-of-Depths


@pytest.mark.parametrize("seq", [32, 7])
def test_mod_keeps_capacity_in_routed_layers(seq):
    model_config = config(kind="mod")
    _, aux = run(model_config, tokens(seq=seq))
    kept = np.asarray(aux["kept"])
    k = mod_kept_count(model_config, seq)
    assert routed_layers(model_config) == (1, 3)
    assert k == max(1, int(0.125 * seq))
    assert kept.shape == (2, BATCH, seq)
    np.testing.assert_array_equal(kept.sum(axis=-1), k)
    np.testing.assert_allclose(np.asarray(aux["kept_fraction"]), k / seq)
    np.testing.assert_array_equal(np.asarray(aux["depth"]), 2 + kept.sum(axis=0))


def test_mod_gathered_equals_masked():
    gathered_config = config(kind="mod", mod_capacity=0.25)
    masked_config = config(kind="mod", mod_capacity=0.25, execution="masked")
    params = model_and_params(gathered_config)[1]
    gathered_logits, gathered_aux = run(gathered_config, tokens(), params)
    masked_logits, masked_aux = run(masked_config, tokens(), params)
    np.testing.assert_array_equal(np.asarray(gathered_aux["kept"]), np.asarray(masked_aux["kept"]))
    np.testing.assert_allclose(np.asarray(gathered_logits), np.asarray(masked_logits), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("execution", ["gathered", "masked"])
def test_mod_router_weight_scales_only_branch(execution):
    model_config = config(kind="mod", execution=execution)
    model, params = model_and_params(config(kind="mod"))
    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name == "__call__" and context.module.name in ("layer_1", "branch"):
            if context.module.name == "layer_1" or "branch" not in captured:
                captured[context.module.name] = (args, out)
        return out

    with nn.intercept_methods(capture):
        build_model(model_config).apply({"params": params}, tokens())
    (h, _), (new_h, outputs) = captured["layer_1"]
    (branch_input, branch_positions, _), delta = captured["branch"]
    h, new_h, delta, branch_input = (np.asarray(a, np.float64) for a in (h, new_h, delta, branch_input))
    kept = np.asarray(outputs["kept"])
    weight = 1.0 / (1.0 + np.exp(-np.asarray(outputs["logits"], np.float64)))

    np.testing.assert_array_equal(new_h[~kept], h[~kept])
    if execution == "gathered":
        assert branch_input.shape[1] == mod_kept_count(model_config, SEQ)
        selected = [np.flatnonzero(kept[row]) for row in range(BATCH)]
        np.testing.assert_array_equal(np.asarray(branch_positions), np.stack(selected))
        expected = np.stack([h[row, selected[row]] + weight[row, selected[row], None] * delta[row]
                             for row in range(BATCH)])
        actual = np.stack([new_h[row, selected[row]] for row in range(BATCH)])
    else:
        expected = (h + weight[..., None] * delta)[kept]
        actual = new_h[kept]
    # Scaling the residual too (r * (x + f(x))) would move kept tokens by (1 - r) * x, far above the tolerance.
    assert weight[kept].max() < 0.9
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-6)


def test_mod_causal_routing_ignores_later_tokens():
    model_config = config(kind="mod")
    base = tokens()
    changed = base.at[:, 20].set((base[:, 20] + 1) % 258)
    before, aux = run(model_config, base, causal_routing=True)
    after, _ = run(model_config, changed, causal_routing=True)
    kept = np.asarray(aux["kept"])
    assert kept.any(), "the decoding rule must route some tokens"
    assert not kept.all(), "the decoding rule must skip some tokens"
    np.testing.assert_array_equal(np.asarray(before[:, :20]), np.asarray(after[:, :20]))
    assert not np.allclose(before[:, 20:], after[:, 20:])
    np.testing.assert_array_equal(kept, np.asarray(aux["router_logits"]) > 0)


def test_mod_aux_router_learns_only_from_bce():
    model_config = config(kind="mod", causality="aux_router")
    model, params = model_and_params(model_config)
    batch = tokens()

    def losses(p):
        logits, aux = model.apply({"params": p}, batch[:, :-1])
        lm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
        return lm, aux["router_loss"]

    lm_grad = jax.jit(jax.grad(lambda p: losses(p)[0]))(params)
    bce_grad = jax.jit(jax.grad(lambda p: losses(p)[1]))(params)
    for layer in ("layer_1", "layer_3"):
        for name in ("aux_router_hidden", "aux_router_kernel"):
            np.testing.assert_array_equal(np.asarray(lm_grad["mod"][layer][name]), 0.0)
            assert np.abs(np.asarray(bce_grad["mod"][layer][name])).max() > 0
        assert np.abs(np.asarray(lm_grad["mod"][layer]["router_kernel"])).max() > 0, "the router weight needs LM gradient"


def test_mod_flops_count_kept_tokens():
    model_config = config(kind="mod", mod_capacity=0.25)
    vanilla = forward_flops(config(kind="vanilla"), SEQ)
    router = 2 * 2 * SEQ * model_config.d_model  # two routed layers, a linear router on every token
    full = forward_flops(config(kind="mod", mod_capacity=1.0), SEQ)
    assert full == vanilla + router
    assert forward_flops(model_config, SEQ, gathered=False) == full
    assert forward_flops(model_config, SEQ) < full


# D-LLM


@pytest.mark.parametrize("target", [0.2, 0.9])
def test_dllm_rate_moves_toward_target(target):
    model_config = config(kind="dllm", target_execution_rate=target, dllm_always_execute=2)
    model, params = model_and_params(model_config)
    batch = jax.random.randint(jax.random.key(5), (8, SEQ + 1), 0, 258)
    optimizer = optax.adam(1e-2)

    def loss(p):
        logits, aux = model.apply({"params": p}, batch[:, :-1])
        lm = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))
        return lm + aux["router_loss"], aux["execution_rate"]

    @jax.jit
    def step(p, state):
        (_, rate), grads = jax.value_and_grad(loss, has_aux=True)(p)
        updates, state = optimizer.update(grads, state, p)
        return optax.apply_updates(p, updates), state, rate

    state = optimizer.init(params)
    rates = []
    for _ in range(40):
        params, state, rate = step(params, state)
        rates.append(float(rate))
    assert abs(rates[0] - target) > 0.2, f"the initial rate {rates[0]} should start far from the target"
    final = np.mean(rates[-10:])
    assert abs(final - target) < 0.25 * abs(rates[0] - target), rates


def test_dllm_first_tokens_always_execute(monkeypatch):
    # Every decision module decides to skip. A bias-free linear router cannot be set to do that for every input.
    monkeypatch.setattr(dllm, "router_logits", lambda params, h: -jnp.ones(h.shape[:-1] + (1,), jnp.float32))
    model_config = config(kind="dllm", dllm_always_execute=3)
    model, params = model_and_params(model_config)
    logits, aux = jax.jit(model.apply)({"params": params}, tokens())
    kept = np.asarray(aux["kept"])
    assert kept[:, :, :3].all()
    assert not kept[:, :, 3:].any()
    np.testing.assert_array_equal(np.asarray(aux["depth"])[:, :3], model_config.num_layers)
    np.testing.assert_allclose(float(aux["execution_rate"]), 3 / SEQ)


def find_unchanged_decision(model_config, params, position):
    """Return (original, changed) token batches that differ only at `position`.

    The token at `position` is skipped in both, by the first layer of `model_config`.
    """
    base = tokens(seed=3)
    kept = np.asarray(run(model_config, base, params)[1]["kept"])[0]
    assert not kept[:, position].any(), "choose a position both rows skip"
    for replacement in range(258):
        changed = base.at[:, position].set(replacement)
        if not np.asarray(run(model_config, changed, params)[1]["kept"])[0][:, position].any() and \
                not np.array_equal(changed, base):
            return base, changed
    raise AssertionError("no replacement token keeps the position skipped")


def skipped_position(model_config, params, start: int = 4):
    kept = np.asarray(run(model_config, tokens(seed=3), params)[1]["kept"])[0]
    for position in range(start, SEQ - 4):
        if not kept[:, position].any() and kept[:, position + 1:].any():
            return position
    raise AssertionError("no position is skipped in both rows")


def test_dllm_skipped_token_is_invisible():
    model_config = config(kind="dllm", num_layers=1)
    params = model_and_params(model_config)[1]
    position = skipped_position(model_config, params)
    base, changed = find_unchanged_decision(model_config, params, position)
    before, _ = run(model_config, base, params)
    after, _ = run(model_config, changed, params)
    others = np.arange(SEQ) != position
    np.testing.assert_array_equal(np.asarray(before)[:, others], np.asarray(after)[:, others])
    assert not np.allclose(before[:, position], after[:, position])


def test_dllm_executing_everything_equals_vanilla():
    model_config = config(kind="dllm")
    vanilla_config = config(kind="vanilla")
    params = set_router_kernels(model_and_params(model_config)[1], 0.0)  # logit 0 executes
    vanilla_params = dict(params, **{f"layer_{i}": params["dllm"][f"layer_{i}"]["branch"] for i in range(4)})
    del vanilla_params["dllm"]
    logits, aux = run(model_config, tokens(), params)
    expected, _ = run(vanilla_config, tokens(), vanilla_params)
    assert np.asarray(aux["kept"]).all()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_dllm_decisions_get_lm_gradient():
    model_config = config(kind="dllm")
    model, params = model_and_params(model_config)
    batch = tokens()

    def lm_loss(p):
        logits, _ = model.apply({"params": p}, batch[:, :-1])
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]))

    grads = jax.jit(jax.grad(lm_loss))(params)
    for i in range(model_config.num_layers):
        assert np.abs(np.asarray(grads["dllm"][f"layer_{i}"]["router_kernel"])).max() > 0


# Leap-of-Thought


def summary_attention_reference(q, k, v, executed):
    """Numpy loop over queries: executed keys up to t, own key, and the mean key/value of earlier leaped tokens."""
    batch, seq, heads, head_dim = q.shape
    kv_heads = k.shape[2]
    out = np.zeros_like(q)
    for b in range(batch):
        for t in range(seq):
            keys = [s for s in range(t + 1) if executed[b, s] or s == t]
            leaped = [s for s in range(t) if not executed[b, s]]
            for head in range(heads):
                g = head // (heads // kv_heads)
                key_rows = [k[b, s, g] for s in keys]
                value_rows = [v[b, s, g] for s in keys]
                if leaped:
                    key_rows.append(np.mean([k[b, s, g] for s in leaped], axis=0))
                    value_rows.append(np.mean([v[b, s, g] for s in leaped], axis=0))
                scores = np.array(key_rows) @ q[b, t, head] / np.sqrt(head_dim)
                probs = np.exp(scores - scores.max())
                probs /= probs.sum()
                out[b, t, head] = probs @ np.array(value_rows)
    return out


def test_lot_summary_attention_matches_reference():
    model_config = config(kind="lot")
    seq = 10
    x = jax.random.normal(jax.random.key(7), (BATCH, seq, model_config.d_model))
    positions = jnp.broadcast_to(jnp.arange(seq), (BATCH, seq))
    executed = jax.random.bernoulli(jax.random.key(8), 0.5, (BATCH, seq))
    module = SummaryAttention(model_config)
    variables = module.init(jax.random.key(0), x, positions, executed)
    actual = module.apply(variables, x, positions, executed)

    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name in ("query", "key", "value"):
            captured[context.module.name] = np.asarray(out, np.float64)
        return out

    with nn.intercept_methods(capture):
        module.apply(variables, x, positions, executed)
    from mor_jax.model.layers import apply_rope

    q = np.asarray(apply_rope(jnp.asarray(captured["query"]), positions, model_config.rope_theta), np.float64)
    k = np.asarray(apply_rope(jnp.asarray(captured["key"]), positions, model_config.rope_theta), np.float64)
    heads_out = summary_attention_reference(q, k, captured["value"], np.asarray(executed))
    out_kernel = np.asarray(nn.unbox(variables["params"])["out"]["kernel"], np.float64)
    expected = np.einsum("bthd,hdm->btm", heads_out, out_kernel)
    assert np.asarray(executed).any()
    assert not np.asarray(executed).all()
    np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5)


def test_lot_executing_everything_equals_vanilla():
    model_config = config(kind="lot")
    params = set_router_kernels(model_and_params(model_config)[1], 0.0)
    vanilla_params = dict(params, **{
        f"layer_{i}": {key: value for key, value in params["lot"][f"layer_{i}"].items() if key != "router_kernel"}
        for i in range(4)
    })
    del vanilla_params["lot"]
    logits, aux = run(model_config, tokens(), params)
    expected, _ = run(config(kind="vanilla"), tokens(), vanilla_params)
    assert np.asarray(aux["kept"]).all()
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=1e-5, atol=1e-5)


def test_lot_leaped_token_stays_visible_to_later_tokens():
    model_config = config(kind="lot", num_layers=1)
    params = model_and_params(model_config)[1]
    position = skipped_position(model_config, params)
    base, changed = find_unchanged_decision(model_config, params, position)
    before, aux = run(model_config, base, params)
    after, _ = run(model_config, changed, params)
    np.testing.assert_array_equal(np.asarray(before)[:, :position], np.asarray(after)[:, :position])
    later_executed = np.asarray(aux["kept"])[0][:, position + 1:]
    moved = ~np.isclose(np.asarray(before)[:, position + 1:], np.asarray(after)[:, position + 1:]).all(axis=-1)
    # Every later executed token attends to the changed token through the context key. Later leaped tokens keep
    # their state.
    np.testing.assert_array_equal(moved, later_executed)


@pytest.mark.parametrize("kind", ["dllm", "lot"])
def test_skipping_models_are_causal(kind):
    model_config = config(kind=kind)
    base = tokens()
    changed = base.at[:, 20].set((base[:, 20] + 1) % 258)
    before, aux = run(model_config, base)
    after, _ = run(model_config, changed)
    kept = np.asarray(aux["kept"])
    assert kept.any()
    assert not kept.all()
    np.testing.assert_array_equal(np.asarray(before[:, :20]), np.asarray(after[:, :20]))
    assert not np.allclose(before[:, 20:], after[:, 20:])


@pytest.mark.parametrize("kind", ["dllm", "lot"])
def test_skipping_flops(kind):
    model_config = config(kind=kind)
    decisions = model_config.num_layers * 2 * SEQ * model_config.d_model
    vanilla = forward_flops(config(kind="vanilla"), SEQ)
    everything = forward_flops(model_config, SEQ, gathered=False)
    context = model_config.num_layers * 2 * SEQ * model_config.num_heads * model_config.head_dim * 2
    assert everything == vanilla + decisions + (context if kind == "lot" else 0)
    assert forward_flops(dataclasses.replace(model_config, target_execution_rate=1.0), SEQ) == everything
    assert forward_flops(model_config, SEQ) < everything


# Configuration


@pytest.mark.parametrize("overrides,message", [
    (["model.kind=dllm"], "set model.execution=masked"),
    (["model.kind=lot", "model.execution=gathered"], "set model.execution=masked"),
    (["model.kind=mod", "model.mod_capacity=0"], "model.mod_capacity=0.0 must be in (0, 1]"),
    (["model.kind=mod", "model.mod_every=9"], "model.mod_every=9"),
    (["model.target_execution_rate=1.5"], "model.target_execution_rate=1.5"),
    (["model.kind=dllm", "model.execution=masked", "model.dllm_always_execute=-1"], "must be >= 0"),
    (["model.kind=mod", "model.kv_strategy=recursive_sharing"], "model.kind=mod"),
])
def test_invalid_peer_config(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def test_peer_kinds_ignore_recursion_layout():
    # 7 layers cannot be split into middle-cycle recursions, which only the recursive kinds need.
    for kind in ("mod", "dllm", "lot"):
        assert load_config(None, [f"model.kind={kind}", "model.num_layers=7", "model.execution=masked"])


def test_branch_is_the_decoder_layer_delta():
    from mor_jax.model.layers import DecoderLayer, causal_mask

    model_config = config(kind="vanilla")
    x = jax.random.normal(jax.random.key(2), (BATCH, 8, model_config.d_model))
    positions = jnp.broadcast_to(jnp.arange(8), (BATCH, 8))
    mask = causal_mask(BATCH, 8)
    variables = DecoderLayer(model_config).init(jax.random.key(0), x, positions, mask)
    layer_out, _ = DecoderLayer(model_config).apply(variables, x, positions, mask)
    branch_out = ResidualBranch(model_config).apply(variables, x, positions, mask)
    np.testing.assert_allclose(np.asarray(x + branch_out), np.asarray(layer_out), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind,router_params", [
    ("mod", 16 * 960),  # a 960 -> 1 router in each of the 16 routed layers
    ("lot", 32 * 960),  # a 960 -> 1 router in each of the 32 layers
    ("dllm", 32 * (960 * 64 + 64)),  # a 960 -> 64 -> 1 decision module before each of the 32 layers
])
def test_360m_peer_presets_add_only_routers(kind, router_params):
    from mor_jax.tools.count_params import count_parameters

    vanilla = count_parameters(os.path.join(PAPER, "360m_vanilla.yaml"))
    peer = count_parameters(os.path.join(PAPER, f"360m_{kind}.yaml"))
    assert peer["router_params"] == router_params
    assert peer["total_params"] == vanilla["total_params"] + router_params
