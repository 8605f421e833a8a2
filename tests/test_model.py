"""Model invariants: shapes, causality, equivalences between kinds, expert-choice routing and parameter sharing."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ModelConfig
from mor_jax.model import build_model, init_params, top_k_indices, top_k_mask
from mor_jax.training.state import count_params

BATCH, SEQ = 2, 12
TINY = ModelConfig(
    kind="mor", num_layers=8, num_recursions=3, vocab_size=384, d_model=32, num_heads=4, num_kv_heads=2,
    head_dim=8, d_ff=64,
)


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def tokens(seed=1, batch=BATCH, seq=SEQ):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, 258)


def init(config):
    model = build_model(config)
    return model, nn.unbox(init_params(model, jax.random.key(0)))


def layer_param_count(c: ModelConfig) -> int:
    attention = c.d_model * c.num_heads * c.head_dim * 2 + c.d_model * c.num_kv_heads * c.head_dim * 2
    return attention + 3 * c.d_model * c.d_ff + 2 * c.d_model


@pytest.mark.parametrize("kind", ["vanilla", "recursive", "mor"])
def test_output_shapes(kind):
    config = tiny(kind=kind)
    model, params = init(config)
    logits, aux = model.apply({"params": params}, tokens())
    assert logits.shape == (BATCH, SEQ, config.vocab_size)
    assert logits.dtype == jnp.float32
    assert aux["depth"].shape == (BATCH, SEQ)
    assert aux["router_loss"].shape == ()
    if kind != "vanilla":
        assert aux["kept"].shape == (config.num_recursions, BATCH, SEQ)
        assert aux["kept_fraction"].shape == (config.num_recursions,)


@pytest.mark.parametrize("kind,causal_routing", [("vanilla", False), ("recursive", False), ("mor", True)])
def test_later_token_never_changes_earlier_logits(kind, causal_routing):
    model, params = init(tiny(kind=kind))
    base = tokens()
    changed = base.at[:, 7].set((base[:, 7] + 1) % 258)
    apply = jax.jit(model.apply, static_argnames="causal_routing")
    before, _ = apply({"params": params}, base, causal_routing=causal_routing)
    after, _ = apply({"params": params}, changed, causal_routing=causal_routing)
    np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
    assert not np.allclose(before[:, 7:], after[:, 7:])


def test_recursive_with_one_recursion_equals_vanilla():
    vanilla_config = tiny(kind="vanilla", num_layers=4)
    recursive_config = tiny(kind="recursive", num_layers=4, num_recursions=1)
    vanilla, vanilla_params = init(vanilla_config)
    recursive, _ = init(recursive_config)
    mapped = {
        "embed": vanilla_params["embed"],
        "final_norm": vanilla_params["final_norm"],
        "prelude": vanilla_params["layer_0"],
        "recursion": {"block": {"layer_0": vanilla_params["layer_1"], "layer_1": vanilla_params["layer_2"]}},
        "coda": vanilla_params["layer_3"],
    }
    expected, _ = vanilla.apply({"params": vanilla_params}, tokens())
    actual, _ = recursive.apply({"params": mapped}, tokens())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)


def test_mor_without_gating_at_full_capacity_equals_recursive():
    recursive, params = init(tiny(kind="recursive"))
    mor, mor_params = init(tiny(kind="mor", capacities=(1.0, 1.0, 1.0), gating=False))
    with_router = dict(params, recursion=dict(params["recursion"], router_kernel=mor_params["recursion"]["router_kernel"]))
    expected, _ = recursive.apply({"params": params}, tokens())
    actual, aux = mor.apply({"params": with_router}, tokens())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    assert bool(jnp.all(aux["kept"]))


def test_gating_changes_the_output():
    # Guards the test above: gating on must make a difference, or that equality proves nothing.
    _, params = init(tiny(kind="recursive"))
    gated, mor_params = init(tiny(kind="mor", capacities=(1.0, 1.0, 1.0)))
    with_router = dict(params, recursion=dict(params["recursion"], router_kernel=mor_params["recursion"]["router_kernel"]))
    recursive_logits, _ = build_model(tiny(kind="recursive")).apply({"params": params}, tokens())
    gated_logits, _ = gated.apply({"params": with_router}, tokens())
    assert not np.allclose(gated_logits, recursive_logits, atol=1e-3)


@pytest.mark.parametrize("seq", [12, 7, 30])
def test_expert_choice_keeps_exactly_k_in_nested_sets(seq):
    config = tiny()
    model, params = init(config)
    _, aux = jax.jit(model.apply)({"params": params}, tokens(seq=seq))
    kept = np.asarray(aux["kept"])
    counts = config.kept_counts(seq)
    for r in range(config.num_recursions):
        np.testing.assert_array_equal(kept[r].sum(axis=-1), [counts[r]] * BATCH)
        if r:
            assert not np.any(kept[r] & ~kept[r - 1]), f"recursion {r} kept a token dropped at recursion {r - 1}"
    np.testing.assert_array_equal(aux["depth"], kept.sum(axis=0))


def test_default_capacities_follow_the_schedule():
    assert tiny(num_recursions=3).capacity_fractions() == (1.0, 2 / 3, 1 / 3)
    assert tiny(num_recursions=3).kept_counts(3) == (3, 2, 1)
    assert tiny(num_recursions=4, num_layers=6).kept_counts(8) == (8, 6, 4, 2)
    assert tiny(num_recursions=3).kept_counts(1) == (1, 1, 1)


def test_top_k_indices_are_ascending_and_match_mask():
    logits = jax.random.normal(jax.random.key(3), (4, 16))
    candidates = jax.random.bernoulli(jax.random.key(4), 0.7, (4, 16)).at[:, :6].set(True)
    indices = np.asarray(top_k_indices(logits, candidates, 5))
    mask = np.asarray(top_k_mask(logits, candidates, 5))
    assert np.all(np.diff(indices, axis=-1) > 0)
    for row in range(4):
        np.testing.assert_array_equal(np.flatnonzero(mask[row]), indices[row])
        assert candidates[row, indices[row]].all()
        best = np.sort(np.where(candidates[row], logits[row], -np.inf))[-5:]
        np.testing.assert_allclose(np.sort(logits[row, indices[row]]), best)


def lm_loss_grad(config, params):
    model = build_model(config)

    def loss(p):
        logits, _ = model.apply({"params": p}, tokens())
        return jnp.mean(jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, tokens()[..., None], -1)[..., 0])

    return jax.jit(jax.grad(loss))(params)


def test_router_gets_gradient_through_gate():
    config = tiny()
    _, params = init(config)
    grad = np.asarray(lm_loss_grad(config, params)["recursion"]["router_kernel"])
    assert np.all(np.linalg.norm(grad.reshape(config.num_recursions, -1), axis=-1) > 0), \
        "every recursion's router needs LM gradient"


def test_router_gets_no_lm_gradient_without_gate():
    config = tiny(gating=False)
    _, params = init(config)
    grad = lm_loss_grad(config, params)["recursion"]["router_kernel"]
    np.testing.assert_array_equal(np.asarray(grad), 0.0)


def test_unkept_tokens_pass_through_recursion_unchanged():
    # With one recursion keeping 1/4 of the tokens and a coda-free view of the block output, tokens the router
    # drops must leave the recursion exactly as they entered it.
    config = tiny(num_layers=3, num_recursions=1, capacities=(0.25,))
    model, params = init(config)
    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name in ("prelude", "recursion") and context.method_name == "__call__":
            captured[context.module.name] = out
        return out

    with nn.intercept_methods(capture):
        model.apply({"params": params}, tokens())
    before = np.asarray(captured["prelude"][0])  # DecoderLayer returns (output, (keys, values))
    after, aux = captured["recursion"]
    kept = np.asarray(aux["kept"][0])
    np.testing.assert_array_equal(np.asarray(after)[~kept], before[~kept])
    assert not np.allclose(np.asarray(after)[kept], before[kept])


def test_middle_cycle_parameters_are_stored_once():
    config = tiny(num_layers=8, num_recursions=3)
    _, params = init(config)
    per_layer = layer_param_count(config)
    embedding = config.vocab_size * config.d_model
    router = config.num_recursions * config.d_model  # one linear router per recursion
    expected = embedding + per_layer * (1 + config.block_layers + 1) + router + config.d_model
    assert count_params(params) == expected
    assert count_params(params["recursion"]["block"]) == per_layer * config.block_layers
    vanilla = count_params(init(tiny(kind="vanilla"))[1])
    assert vanilla == embedding + per_layer * config.num_layers + config.d_model
