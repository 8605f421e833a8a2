"""The compute-saving gathered path against the masked reference, and the analytic FLOP counter."""

import dataclasses
import itertools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ConfigError, ModelConfig, load_config
from mor_jax.model import build_model, init_variables
from mor_jax.model.capacity import token_choice_buffer_sizes
from mor_jax.training.flops import forward_flops, layer_flops, peak_flops_per_device
from mor_jax.training.steps import loss_and_metrics

TINY = ModelConfig(kind="mor", num_layers=8, num_recursions=3, vocab_size=384, d_model=32, num_heads=4,
                   num_kv_heads=2, head_dim=8, d_ff=64)
ROUTINGS = (("recursive", "expert_choice"), ("mor", "expert_choice"), ("mor", "token_choice"))
KV_STRATEGIES = ("recursion_wise_caching", "recursive_sharing")
# Float32 on CPU: the two paths run the same per-token arithmetic, but matmuls over different shapes may sum in
# another order, which moves results by a few ulps; 1e-5 leaves room for that and nothing more.
TOLERANCE = dict(rtol=1e-5, atol=1e-5)


def batch(seed=2, rows=2, seq=13):
    return jax.random.randint(jax.random.key(seed), (rows, seq + 1), 0, 258)


def pair(**changes):
    masked = dataclasses.replace(TINY, execution="masked", **changes)
    gathered = dataclasses.replace(masked, execution="gathered")
    variables = nn.unbox(init_variables(build_model(masked), jax.random.key(0)))
    return build_model(masked), build_model(gathered), variables


@pytest.mark.parametrize("sharing,kind_routing,kv",
                         list(itertools.product(("middle_cycle", "sequence"), ROUTINGS, KV_STRATEGIES)))
def test_gathered_matches_masked_logits_and_losses(sharing, kind_routing, kv):
    kind, routing = kind_routing
    # capacity_factor 3 makes every token-choice buffer hold the whole sequence, so no token overflows.
    masked, gathered, variables = pair(kind=kind, routing=routing, sharing=sharing, kv_strategy=kv,
                                       num_layers=8 if sharing == "middle_cycle" else 6, capacity_factor=3.0)
    tokens = batch()[:, :-1]
    expected, expected_aux = jax.jit(masked.apply)(variables, tokens)
    actual, actual_aux = jax.jit(gathered.apply)(variables, tokens)
    np.testing.assert_allclose(actual, expected, **TOLERANCE)
    np.testing.assert_array_equal(actual_aux["kept"], expected_aux["kept"])
    np.testing.assert_allclose(actual_aux["router_loss"], expected_aux["router_loss"], **TOLERANCE)


def test_gathered_path_is_really_taken():
    # Guards the equivalence tests: the gathered model must compile to smaller matmuls than the masked one.
    masked, gathered, variables = pair()
    tokens = batch()[:, :-1]
    masked_text = jax.jit(lambda v, t: masked.apply(v, t)).lower(variables, tokens).as_text()
    gathered_text = jax.jit(lambda v, t: gathered.apply(v, t)).lower(variables, tokens).as_text()
    k_last = TINY.kept_counts(13)[-1]
    assert f"tensor<2x{k_last}x32xf32>" in gathered_text
    assert f"tensor<2x{k_last}x32xf32>" not in masked_text


@pytest.mark.parametrize("kind_routing,kv", list(itertools.product(ROUTINGS, KV_STRATEGIES)))
def test_gathered_matches_masked_gradients(kind_routing, kv):
    kind, routing = kind_routing
    masked, gathered, variables = pair(kind=kind, routing=routing, kv_strategy=kv, capacity_factor=3.0)
    params = variables.pop("params")
    tokens = batch()

    def grads(model):
        loss = lambda p: loss_and_metrics(model, p, variables, tokens, pad_id=257)[0]
        return jax.jit(jax.grad(loss))(params)

    expected, actual = grads(masked), grads(gathered)
    for path, left in jax.tree_util.tree_leaves_with_path(expected):
        right = actual
        for entry in path:
            right = right[entry.key]
        np.testing.assert_allclose(right, left, rtol=1e-4, atol=1e-6, err_msg=jax.tree_util.keystr(path))


def test_token_choice_overflow_stops_tokens_early():
    # With capacity_factor 0.5 the later buffers are too small for balanced routing, so some tokens overflow.
    config = dataclasses.replace(TINY, routing="token_choice", execution="gathered", capacity_factor=0.5,
                                 balancing="loss_free")
    model = build_model(config)
    variables = nn.unbox(init_variables(model, jax.random.key(0)))
    variables["router_state"]["recursion"]["bias"] = jnp.asarray([0.0, 0.0, 1e3])  # every token wants depth 3
    seq = 12
    _, aux = jax.jit(model.apply)(variables, batch(seq=seq)[:, :-1])
    sizes = token_choice_buffer_sizes(config, seq, 0.5)
    kept = np.asarray(aux["kept"])
    for r, size in enumerate(sizes):
        assert (kept[r].sum(-1) == size).all()
        # The buffer keeps the earliest tokens, so a token's place never depends on later ones.
        assert kept[r][:, :size].all()
    # Every token wants all three recursions, so only the tokens of the last buffer avoid stopping early.
    assert float(aux["overflow_fraction"]) == pytest.approx(1 - sizes[-1] / seq)


def test_capacity_warmup_requires_masked_path():
    with pytest.raises(ConfigError, match="set model.execution=masked"):
        load_config("configs/smoke.yaml", ["model.execution=gathered", "model.capacity_warmup_steps=10"])


def test_layer_flops_hand_count():
    config = dataclasses.replace(TINY, d_model=4, num_heads=2, num_kv_heads=1, head_dim=2, d_ff=8)
    # 3 tokens, causal pairs 1 + 2 + 3 = 6.
    q_and_out = 2 * 3 * (4 * 2 * 2) * 2  # query and output projections: 3 tokens x 16 MACs each, twice
    k_and_v = 2 * 3 * (4 * 1 * 2) * 2
    attention = 2 * 6 * (2 * 2) * 2  # scores and values: 6 pairs x 2 heads x head_dim 2
    mlp = 2 * 3 * (4 * 8) * 3
    assert layer_flops(config, 3, 6, 3) == q_and_out + k_and_v + attention + mlp


def test_forward_flops_hand_count():
    config = dataclasses.replace(TINY, d_model=4, num_heads=2, num_kv_heads=1, head_dim=2, d_ff=8, vocab_size=10,
                                 num_layers=5, num_recursions=3)  # prelude, 1-layer block x 3, coda
    seq = 6
    k = config.kept_counts(seq)
    assert k == (6, 4, 2)
    full = layer_flops(config, 6, 21, 6)
    recursions = sum(layer_flops(config, n, n * (n + 1) // 2, n) for n in k)
    routers = 2 * (6 + 6 + 4) * 4  # each recursion scores the previous recursion's kept tokens
    logits = 2 * 6 * 4 * 10
    assert forward_flops(config, seq) == logits + 2 * full + recursions + routers
    vanilla = dataclasses.replace(config, kind="vanilla")
    assert forward_flops(vanilla, seq) == logits + 5 * full
    assert forward_flops(config, seq, gathered=False) > forward_flops(config, seq)


def test_mor_flops_fall_with_more_recursions():
    # Paper-sized 360M shapes: expert-choice MoR against vanilla with the same unrolled depth.
    base = dataclasses.replace(TINY, d_model=960, num_heads=15, num_kv_heads=5, head_dim=64, d_ff=2560,
                               vocab_size=49152)
    ratios = []
    for n, layers in ((2, 32), (3, 32), (4, 34)):
        config = dataclasses.replace(base, num_recursions=n, num_layers=layers)
        ratios.append(forward_flops(config, 2048) / forward_flops(dataclasses.replace(config, kind="vanilla"), 2048))
    assert ratios == sorted(ratios, reverse=True)
    # The recursions run (N_r + 1) / (2 N_r) of their full-length compute, plus the unshared layers and logits.
    assert ratios[0] < 0.8
    assert ratios[-1] < 0.7


def test_peak_flops_lookup():
    assert peak_flops_per_device("TPU v5p") == 459e12
    assert peak_flops_per_device("cpu") is None


def test_flop_budget_sets_the_step_count(tmp_path):
    from mor_jax.training import train

    config = load_config("configs/smoke.yaml", [f"train.run_dir={tmp_path}", "train.checkpoint_every=100"])
    per_step = forward_flops(config.model, config.data.seq_len) * config.data.batch_size
    budget_config = load_config("configs/smoke.yaml", [f"train.run_dir={tmp_path}", "train.checkpoint_every=100",
                                                        f"train.flop_budget={3.5 * per_step}"])
    result = train(budget_config)
    assert result["step"] == 3
    assert result["model_flops_per_second"] > 0
    with pytest.raises(ConfigError, match="less than one step"):
        train(load_config("configs/smoke.yaml", [f"train.run_dir={tmp_path}/b", f"train.flop_budget={per_step / 2}"]))
