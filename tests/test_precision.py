"""Mixed precision (float32 parameters, bfloat16 compute) and rematerialisation of the decoder layers."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ConfigError, load_config
from mor_jax.model import build_model, init_params
from mor_jax.training.steps import loss_and_metrics

SMOKE = "configs/smoke.yaml"
PAD_ID = 257
D_FF = 128  # smoke.yaml's model.d_ff; no other dimension of the smoke model has this size
VARIANTS = {
    "mor_ec_gathered": (),
    "mor_ec_masked": ("model.execution=masked",),
    "mor_tc_gathered": ("model.routing=token_choice",),
    "vanilla": ("model.kind=vanilla",),
}
# Names of jax.checkpoint's primitive in a jaxpr (before and after differentiation).
REMAT_PRIMITIVES = ("checkpoint", "remat2")


def tokens(rows=4, seq=33):
    return jnp.asarray(np.random.default_rng(0).integers(0, 256, (rows, seq)), jnp.int32)


@functools.lru_cache(maxsize=None)
def loss_and_grads(overrides: tuple):
    """Loss, metrics, gradients, parameters and the jaxpr of the gradient, on a fixed batch (cached: compiles are
    the slow part)."""
    batch = tokens()
    config = load_config(SMOKE, list(overrides))
    model = build_model(config.model)
    params = nn.unbox(init_params(model, jax.random.key(0)))

    def loss(params):
        return loss_and_metrics(model, params, {}, batch, PAD_ID)

    (value, (metrics, _)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return value, metrics, grads, params, jax.make_jaxpr(jax.value_and_grad(lambda p: loss(p)[0]))(params)


def equations(jaxpr):
    """Yield every equation of a jaxpr, including those of nested jaxprs (scan, remat, cond, pjit)."""
    for equation in jaxpr.eqns:
        yield equation
        for value in equation.params.values():
            for item in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(item, "jaxpr", item)
                if hasattr(inner, "eqns"):
                    yield from equations(inner)


# The masked path and vanilla run the same layers as the gathered paths; they are left out to save compile time.
@pytest.mark.parametrize("variant", ["mor_ec_gathered", "mor_tc_gathered"])
def test_bfloat16_compute_float32_params_and_loss(variant):
    loss32, _, _, _, _ = loss_and_grads(VARIANTS[variant])
    loss16, metrics, grads, params, jaxpr = loss_and_grads((*VARIANTS[variant], "model.dtype=bfloat16"))

    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(params)} == {jnp.dtype(jnp.float32)}
    assert {leaf.dtype for leaf in jax.tree_util.tree_leaves(grads)} == {jnp.dtype(jnp.float32)}
    for key in ("loss", "lm_loss", "router_loss"):
        assert metrics[key].dtype == jnp.float32, key
    # Every MLP matmul (an operand with a d_ff axis) runs in bfloat16.
    mlp_dots = [eq for eq in equations(jaxpr.jaxpr) if eq.primitive.name == "dot_general"
                and any(D_FF in var.aval.shape for var in eq.invars)]
    assert mlp_dots
    assert {str(var.aval.dtype) for eq in mlp_dots for var in eq.invars} == {"bfloat16"}
    # Measured relative difference from float32: 8e-6 to 2e-5 on these variants. Norms, softmax, routers and the
    # loss run in float32, so only the bfloat16 matmul inputs add error; 1e-3 still catches a loss in bfloat16.
    assert abs(float(loss16) - float(loss32)) <= 1e-3 * float(loss32)


def test_remat_rejects_unknown_policy():
    with pytest.raises(ConfigError, match="model.remat='some'.*none, full, save_dots"):
        load_config(SMOKE, ["model.remat=some"])


@pytest.mark.parametrize("variant, remat", [("mor_ec_gathered", "full"), ("mor_ec_gathered", "save_dots"),
                                            ("mor_ec_masked", "full"), ("vanilla", "save_dots")])
def test_remat_matches_no_remat(variant, remat):
    loss, _, grads, _, jaxpr = loss_and_grads(VARIANTS[variant])
    remat_loss, _, remat_grads, _, remat_jaxpr = loss_and_grads((*VARIANTS[variant], f"model.remat={remat}"))

    assert not [eq for eq in equations(jaxpr.jaxpr) if eq.primitive.name in REMAT_PRIMITIVES]
    policies = {eq.params["policy"] for eq in equations(remat_jaxpr.jaxpr) if eq.primitive.name in REMAT_PRIMITIVES}
    # jax.checkpoint may store nothing_saveable as policy None.
    expected = {"full": {None, jax.checkpoint_policies.nothing_saveable},
                "save_dots": {jax.checkpoint_policies.dots_with_no_batch_dims_saveable}}[remat]
    assert policies and policies <= expected, policies

    assert float(remat_loss) == float(loss)
    # Recomputed activations are fused differently by XLA, so gradients may differ in the last float32 bits
    # (measured at most 1.3e-8 on the smoke model, whose largest gradient entries are ~1e-1).
    for path, a, b in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(grads),
                          jax.tree_util.tree_leaves(remat_grads)):
        np.testing.assert_allclose(b, a, atol=1e-6, rtol=1e-5, err_msg=jax.tree_util.keystr(path[0]))
