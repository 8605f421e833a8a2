"""Gradient accumulation over micro-batches gives the loss and gradients of one big batch."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mor_jax.config import ConfigError, load_config
from mor_jax.model import build_model, init_params
from mor_jax.training.steps import accumulated_gradients, loss_and_metrics, split_microbatches

SMOKE = "configs/smoke.yaml"
PAD_ID = 257
MICROBATCHES = 4


def padded_batch(rows=8, seq=33):
    """Random tokens where rows 1 and 6 end in PAD, so the micro-batches hold different numbers of targets."""
    batch = np.random.default_rng(0).integers(0, 256, (rows, seq)).astype(np.int32)
    batch[1, 10:] = PAD_ID
    batch[6, 20:] = PAD_ID
    return jnp.asarray(batch)


def test_split_microbatches_takes_strided_rows():
    batch = jnp.arange(8)[:, None] * jnp.ones((1, 3), jnp.int32)
    split = split_microbatches(batch, 4)
    assert split.shape == (4, 2, 3)
    assert split[:, :, 0].tolist() == [[0, 4], [1, 5], [2, 6], [3, 7]]


# Exactness needs per-sequence routing: vanilla has none, and expert-choice picks the top-k of each sequence. The
# masked path is included because its scan and switch differ from the gathered path.
@pytest.mark.parametrize("overrides", [("model.kind=vanilla",), (), ("model.execution=masked",)],
                         ids=["vanilla", "mor_ec_gathered", "mor_ec_masked"])
def test_microbatches_match_one_batch(overrides):
    config = load_config(SMOKE, list(overrides))
    model = build_model(config.model)
    params = nn.unbox(init_params(model, jax.random.key(0)))
    batch = padded_batch()

    grad_fn = jax.value_and_grad(loss_and_metrics, argnums=1, has_aux=True)
    (loss, (metrics, _)), grads = jax.jit(lambda p, b: grad_fn(model, p, {}, b, PAD_ID))(params, batch)
    micro_metrics, _, micro_grads = jax.jit(
        lambda p, b: accumulated_gradients(model, p, {}, b, PAD_ID, None, MICROBATCHES))(params, batch)

    # Float32 sums in another order: the measured differences are below 1e-6 relative.
    np.testing.assert_allclose(micro_metrics["loss"], loss, rtol=1e-6)
    for key in ("lm_loss", "router_loss", "mean_depth"):
        np.testing.assert_allclose(micro_metrics[key], metrics[key], rtol=1e-6, atol=1e-9, err_msg=key)
    for (path, expected), actual in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree_util.tree_leaves(micro_grads)):
        np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_microbatches_must_divide_batch():
    with pytest.raises(ConfigError, match="data.batch_size=8 is not divisible by train.microbatches=3"):
        load_config(SMOKE, ["train.microbatches=3"])
