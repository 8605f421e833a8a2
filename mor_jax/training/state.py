"""Train state, AdamW with a warmup-stable-decay schedule, and sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mor_jax.config import Config, TrainConfig
from mor_jax.model import LanguageModel
from mor_jax.training.mesh import shardings_for


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; saved whole in checkpoints."""

    step: jax.Array
    params: Any
    opt_state: Any


def learning_rate_schedule(train: TrainConfig) -> optax.Schedule:
    """Warmup-stable-decay: linear warmup, constant peak, linear decay to 0 over the last decay_fraction of steps."""
    warmup = min(train.warmup_steps, train.steps)
    decay = int(round(train.decay_fraction * train.steps))
    decay = min(decay, train.steps - warmup)
    stable = train.steps - warmup - decay
    peak = train.learning_rate
    schedules = [
        optax.linear_schedule(0.0, peak, max(warmup, 1)) if warmup else optax.constant_schedule(peak),
        optax.constant_schedule(peak),
        optax.linear_schedule(peak, 0.0, max(decay, 1)),
    ]
    return optax.join_schedules(schedules, boundaries=[warmup, warmup + stable])


def _decay_mask(params):
    # Decoupled weight decay on matrices only; norm scales are left alone.
    return jax.tree_util.tree_map(lambda x: x.ndim >= 2, params)


def make_optimizer(train: TrainConfig) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW."""
    return optax.chain(
        optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity(),
        optax.adamw(
            learning_rate_schedule(train), b1=train.adam_b1, b2=train.adam_b2,
            weight_decay=train.weight_decay, mask=_decay_mask,
        ),
    )


def _init_boxed_state(model: LanguageModel, optimizer, rng, seq_len: int) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    params = model.init(rng, tokens)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params))


def abstract_state(config: Config, model: LanguageModel, optimizer) -> TrainState:
    """Shapes, dtypes and logical axes of the train state, computed without allocating it."""
    init_seq = min(config.data.seq_len, 8)
    return jax.eval_shape(lambda rng: _init_boxed_state(model, optimizer, rng, init_seq), jax.random.key(0))


def state_shardings(config: Config, model, optimizer, mesh, rules) -> TrainState:
    """NamedSharding of every leaf of the (unboxed) train state."""
    return shardings_for(abstract_state(config, model, optimizer), mesh, rules)


def create_train_state(config: Config, model, optimizer, mesh, rules) -> TrainState:
    """Initialise parameters and optimizer state directly in their shardings."""
    shardings = state_shardings(config, model, optimizer, mesh, rules)
    init_seq = min(config.data.seq_len, 8)

    def init(rng):
        return nn.unbox(_init_boxed_state(model, optimizer, rng, init_seq))

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)(jax.random.key(config.train.seed))


def count_params(params) -> int:
    """Total number of scalars in a parameter tree (boxed or not)."""
    return sum(int(x.size) for x in jax.tree_util.tree_leaves(nn.unbox(params)))
