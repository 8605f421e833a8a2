"""The MoR family: sharing strategies, token-choice routing, router options and the KV strategies."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ConfigError, ModelConfig, TrainConfig, load_config
from mor_jax.data import load_documents, make_tokenizer, pack_documents
from mor_jax.model import build_model, init_variables
from mor_jax.model.layers import DecoderLayer, causal_mask
from mor_jax.model.routing import warmup_capacities
from mor_jax.model.sharing import layer_map, recursion_slots
from mor_jax.training.state import TrainState, count_params, learning_rate_schedule, make_optimizer
from mor_jax.training.steps import loss_and_metrics, make_train_step

TINY = ModelConfig(kind="mor", num_layers=8, num_recursions=3, vocab_size=384, d_model=32, num_heads=4,
                   num_kv_heads=2, head_dim=8, d_ff=64)
SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTINGS = (("recursive", "expert_choice"), ("mor", "expert_choice"), ("mor", "token_choice"))
KV_STRATEGIES = ("recursion_wise_caching", "recursive_sharing")


def tiny(**changes) -> ModelConfig:
    return dataclasses.replace(TINY, **changes)


def tokens(seed=1, batch=2, seq=12):
    return jax.random.randint(jax.random.key(seed), (batch, seq), 0, 258)


def init(config):
    model = build_model(config)
    variables = nn.unbox(init_variables(model, jax.random.key(0)))
    return model, variables


def layers_for(sharing: str, num_recursions: int = 3) -> int:
    return (2 if sharing.startswith("middle") else 0) + 2 * num_recursions


def test_sharing_maps_match_worked_example():
    assert layer_map("cycle", 9, 3) == [0, 1, 2, 0, 1, 2, 0, 1, 2]
    assert layer_map("sequence", 9, 3) == [0, 0, 0, 1, 1, 1, 2, 2, 2]


@pytest.mark.parametrize("num_layers,num_recursions", [(8, 3), (11, 3), (10, 4), (6, 2), (12, 2)])
def test_middle_sharing_maps_follow_formulas(num_layers, num_recursions):
    block = (num_layers - 2) // num_recursions
    cycle = layer_map("middle_cycle", num_layers, num_recursions)
    sequence = layer_map("middle_sequence", num_layers, num_recursions)
    for mapping in (cycle, sequence):
        assert mapping[0] == 0
        assert mapping[-1] == block + 1
    for l in range(1, num_layers - 1):
        assert cycle[l] == 1 + (l - 1) % block
        assert sequence[l] == 1 + (l - 1) // num_recursions
    assert sorted(set(cycle)) == sorted(set(sequence)) == list(range(block + 2))


def test_sequence_recursions_apply_their_own_layers():
    slots = recursion_slots(tiny(sharing="sequence", num_layers=9))
    np.testing.assert_array_equal(slots, [[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    np.testing.assert_array_equal(recursion_slots(tiny(sharing="cycle", num_layers=9)), [[0, 1, 2]] * 3)


@pytest.mark.parametrize("sharing", SHARINGS)
def test_every_strategy_stores_each_unique_layer_once(sharing):
    config = tiny(kind="recursive", sharing=sharing, num_layers=layers_for(sharing))
    _, variables = init(config)
    unique = len(set(layer_map(sharing, config.num_layers, config.num_recursions)))
    per_layer = count_params(variables["params"]["recursion"]["block"]["layer_0"])
    embedding = config.vocab_size * config.d_model
    assert count_params(variables["params"]) == embedding + unique * per_layer + config.d_model


def test_indivisible_layer_count_suggests_valid_depths():
    with pytest.raises(ConfigError, match=r"model.num_layers=9: middle_cycle sharing needs \(num_layers - 2\) "
                                          r"divisible by model.num_recursions=3; nearest valid num_layers: 8 or 11"):
        load_config("configs/smoke.yaml", ["model.num_layers=9"])
    with pytest.raises(ConfigError, match="cycle sharing needs num_layers divisible.*nearest valid num_layers: 6 or 9"):
        load_config("configs/smoke.yaml", ["model.sharing=cycle", "model.num_layers=7"])


@pytest.fixture(scope="module")
def corpus_batch():
    config = load_config("configs/smoke.yaml")
    train_docs, _ = load_documents(config.data)
    rows = pack_documents(train_docs[:2], make_tokenizer(config.data), 16)
    return jnp.asarray(rows[:4])


def check_routing_invariants(config, aux, seq):
    kept = np.asarray(aux["kept"])
    depth = np.asarray(aux["depth"])
    if config.kind == "recursive":
        assert kept.all()
        return
    if config.routing == "expert_choice":
        counts = config.kept_counts(seq)
        for r in range(config.num_recursions):
            assert (kept[r].sum(-1) == counts[r]).all()
            if r:
                assert not np.any(kept[r] & ~kept[r - 1])
    else:
        assert depth.min() >= 1
        assert depth.max() <= config.num_recursions
        for r in range(config.num_recursions):
            np.testing.assert_array_equal(kept[r], depth > r)


@pytest.mark.slow
@pytest.mark.parametrize("sharing,kind_routing,kv", list(itertools.product(SHARINGS, ROUTINGS, KV_STRATEGIES)))
def test_combination_trains_and_keeps_invariants(sharing, kind_routing, kv, corpus_batch):
    kind, routing = kind_routing
    # Two recursions of a 2-layer block keep compilation short while the sequence strategies still give the two
    # recursions different layers.
    config = tiny(kind=kind, routing=routing, sharing=sharing, kv_strategy=kv, num_recursions=2,
                  num_layers=layers_for(sharing, 2))
    model, variables = init(config)
    params = variables.pop("params")
    train_config = TrainConfig(steps=3, warmup_steps=0, learning_rate=1e-2)
    optimizer = make_optimizer(train_config, config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       model_state=variables)
    step = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(train_config), pad_id=257))
    losses = []
    for _ in range(3):
        state, metrics = step(state, corpus_batch)
        losses.append(float(metrics["loss"]))
    assert np.isfinite(losses).all()
    assert losses[-1] < losses[0]
    _, aux = model.apply({"params": state.params, **state.model_state}, corpus_batch[:, :-1])
    check_routing_invariants(config, aux, corpus_batch.shape[1] - 1)


def test_token_choice_is_causal():
    model, variables = init(tiny(routing="token_choice"))
    base = tokens()
    changed = base.at[:, 7].set((base[:, 7] + 1) % 258)
    apply = jax.jit(model.apply)
    before, aux_before = apply(variables, base)
    after, aux_after = apply(variables, changed)
    np.testing.assert_array_equal(np.asarray(before[:, :7]), np.asarray(after[:, :7]))
    np.testing.assert_array_equal(np.asarray(aux_before["depth"][:, :7]), np.asarray(aux_after["depth"][:, :7]))


def capture_module_outputs(model, variables, inputs, names):
    captured = {}

    def capture(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.module.name in names and context.method_name == "__call__":
            captured[context.module.name] = out
        return out

    with nn.intercept_methods(capture):
        model.apply(variables, inputs)
    return captured


def test_token_choice_max_depth_matches_recursive():
    # capacity_factor 3 gives every recursion a buffer for the whole sequence, so no token stops early.
    config = tiny(routing="token_choice", balancing="loss_free", capacity_factor=3.0)
    model, variables = init(config)
    variables["router_state"]["recursion"]["bias"] = jnp.asarray([0.0, 0.0, 1e3])  # every token picks the last depth
    recursive = build_model(tiny(kind="recursive"))
    recursive_params = {k: v for k, v in variables["params"].items()}
    recursive_params["recursion"] = {"block": variables["params"]["recursion"]["block"]}

    mor_out = capture_module_outputs(model, variables, tokens(), {"prelude", "recursion"})
    rec_out = capture_module_outputs(recursive, {"params": recursive_params}, tokens(), {"recursion"})
    block_input = np.asarray(mor_out["prelude"][0])
    mor_h, aux = mor_out["recursion"]
    rec_h, _ = rec_out["recursion"]
    assert (np.asarray(aux["depth"]) == config.num_recursions).all()
    gate = jax.nn.softmax(aux["router_logits"], axis=-1)[..., -1:]
    np.testing.assert_allclose(np.asarray(mor_h), block_input + np.asarray(gate) * np.asarray(rec_h),
                               rtol=1e-5, atol=1e-5)


def test_aux_router_gets_no_lm_gradient():
    config = tiny(causality="aux_router")
    model, variables = init(config)
    params = variables["params"]

    def lm_only(p):
        logits, _ = model.apply({"params": p}, tokens())
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    def router_loss(p):
        return model.apply({"params": p}, tokens())[1]["router_loss"]

    lm_grad = jax.jit(jax.grad(lm_only))(params)["recursion"]
    np.testing.assert_array_equal(np.asarray(lm_grad["aux_router_kernel"]), 0.0)
    assert np.abs(np.asarray(lm_grad["router_kernel"])).sum() > 0
    bce_grad = jax.jit(jax.grad(router_loss))(params)["recursion"]
    assert np.abs(np.asarray(bce_grad["aux_router_kernel"])).sum() > 0


def test_aux_router_uses_its_learning_rate_multiplier():
    config = tiny(causality="aux_router", aux_router_lr_multiplier=10.0)
    _, variables = init(config)
    params = variables["params"]
    optimizer = make_optimizer(TrainConfig(steps=10, warmup_steps=0, grad_clip=0.0, weight_decay=0.0), config)
    grads = jax.tree_util.tree_map(jnp.ones_like, params)
    updates, _ = optimizer.update(grads, optimizer.init(params), params)
    # The first Adam step moves every weight by the learning rate, so the ratio is the multiplier.
    aux_step = np.abs(np.asarray(updates["recursion"]["aux_router_kernel"])).mean()
    main_step = np.abs(np.asarray(updates["recursion"]["router_kernel"])).mean()
    assert aux_step / main_step == pytest.approx(10.0, rel=1e-4)


@pytest.mark.parametrize("changes", [dict(router_function="tanh"), dict(router_type="mlp", router_mlp_dim=16),
                                     dict(router_z_loss_coef=1e-3)])
def test_expert_choice_router_options(changes):
    config = tiny(**changes)
    model, variables = init(config)
    logits, aux = jax.jit(model.apply)(variables, tokens())
    assert np.isfinite(np.asarray(logits)).all()
    check_routing_invariants(config, aux, 12)
    if "router_type" in changes:
        assert variables["params"]["recursion"]["router_hidden"].shape == (3, 32, 16)
    if "router_z_loss_coef" in changes:
        expected = config.router_bce_coef * aux["router_bce"] + 1e-3 * aux["router_z_loss"]
        assert float(aux["router_loss"]) == pytest.approx(float(expected), rel=1e-6)


def test_capacity_warmup_goes_from_one_to_target():
    config = tiny(capacity_warmup_steps=100)
    np.testing.assert_allclose(warmup_capacities(config, 0), [1.0, 1.0, 1.0])
    np.testing.assert_allclose(warmup_capacities(config, 100), [1.0, 2 / 3, 1 / 3], rtol=1e-6)
    middle = np.asarray(warmup_capacities(config, 50))
    np.testing.assert_allclose(middle, [1.0, (1 + 2 / 3) / 2, (1 + 1 / 3) / 2], rtol=1e-5)
    model, variables = init(config)
    _, aux = model.apply(variables, tokens(), capacities=warmup_capacities(config, 0))
    assert np.asarray(aux["kept"]).all()


def test_loss_free_bias_moves_toward_balance():
    config = tiny(routing="token_choice", balancing="loss_free", bias_update_rate=0.005)
    model, variables = init(config)
    params = variables.pop("params")
    # Token-dependent router preferences, skewed by a starting bias so that every token picks depth 1.
    kernel = params["recursion"]["router_kernel"]
    params["recursion"]["router_kernel"] = 0.5 * jax.random.normal(jax.random.key(5), kernel.shape)
    variables["router_state"]["recursion"]["bias"] = jnp.asarray([1.0, 0.0, 0.0])
    train_config = TrainConfig(steps=400, warmup_steps=0, learning_rate=1e-9)
    optimizer = make_optimizer(train_config, config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       model_state=variables)
    step = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(train_config), pad_id=257))
    batch = tokens(batch=4, seq=33)
    violations = []
    for _ in range(400):
        state, metrics = step(state, batch)
        violations.append(float(metrics["max_violation"]))
    bias = np.asarray(state.model_state["router_state"]["recursion"]["bias"])
    assert violations[0] == pytest.approx(2.0)  # all tokens on one of three depths
    assert np.mean(violations[-20:]) < 0.5, violations[-20:]
    assert bias[0] < 1.0
    assert bias[1] > 0
    assert bias[2] > 0


def manual_recursive_kv_sharing(config, params, inputs):
    """Unrolled reference: later recursions attend to the keys/values of the first recursion."""
    positions = jnp.broadcast_to(jnp.arange(inputs.shape[1]), inputs.shape)
    mask = causal_mask(*inputs.shape)
    layer = DecoderLayer(config)
    embedding = params["embed"]["embedding"]
    h = embedding[inputs]
    h, _ = layer.apply({"params": params["prelude"]}, h, positions, mask)
    first_kv = []
    for r in range(config.num_recursions):
        for j in range(config.block_layers):
            block_params = {"params": params["recursion"]["block"][f"layer_{j}"]}
            if r == 0:
                h, kv = layer.apply(block_params, h, positions, mask)
                first_kv.append(kv)
            else:
                h, _ = layer.apply(block_params, h, positions, mask, kv=first_kv[j])
    h, _ = layer.apply({"params": params["coda"]}, h, positions, mask)
    from mor_jax.model.layers import RMSNorm

    h = RMSNorm(config).apply({"params": params["final_norm"]}, h)
    return h @ embedding.T


def test_recursive_kv_sharing_reuses_first_recursion_kv():
    config = tiny(kind="recursive", kv_strategy="recursive_sharing")
    model, variables = init(config)
    expected = jax.jit(manual_recursive_kv_sharing, static_argnums=0)(config, variables["params"], tokens())
    actual, _ = jax.jit(model.apply)(variables, tokens())
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    caching, _ = jax.jit(build_model(tiny(kind="recursive")).apply)(variables, tokens())
    assert not np.allclose(caching, expected, atol=1e-4), "sharing must differ from recursion-wise caching"


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.router_function=relu"], "model.router_function='relu' is not supported"),
        (["model.kind=vanilla", "model.kv_strategy=recursive_sharing"], "needs recursions"),
        (["model.kv_strategy=recursive_sharing", "model.capacities=[0.5, 0.5, 0.25]"], "first capacity must be 1.0"),
        (["model.routing=token_choice", "model.capacities=[1.0, 0.5, 0.25]"], "expert-choice routing only"),
        (["model.routing=token_choice", "model.router_function=tanh"], "expert-choice routing only"),
        (["model.sharing=diagonal"], "model.sharing='diagonal' is not supported"),
    ],
)
def test_incompatible_options_are_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config("configs/smoke.yaml", overrides)


def test_token_choice_run_reports_routing_statistics(tmp_path):
    from mor_jax.evaluation import evaluate_run, load_run
    from mor_jax.training import train

    run_dir = str(tmp_path / "tc")
    config = load_config("configs/smoke.yaml", [f"train.run_dir={run_dir}", "train.steps=6",
                                                 "model.routing=token_choice", "model.balancing=loss_free"])
    train(config)
    run = load_run(run_dir)
    bias = np.asarray(run.model_state["router_state"]["recursion"]["bias"])
    assert bias.shape == (3,)
    assert np.abs(bias).sum() > 0, "the trained bias must come back from the checkpoint"
    result = evaluate_run(run, max_batches=2)
    assert len(result["depth_fraction"]) == 3
    assert sum(result["depth_fraction"]) == pytest.approx(1.0)
    assert result["max_violation"] >= 0.0
    assert 0.0 <= result["router_entropy"] <= np.log(3) + 1e-6
