"""Train state, AdamW with a warmup-stable-decay schedule, and sharded initialisation."""

from __future__ import annotations

from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mor_jax.config import Config, ModelConfig, TrainConfig
from mor_jax.model import LanguageModel
from mor_jax.training.mesh import check_divisible, shardings_for


@flax.struct.dataclass
class TrainState:
    """Everything a training step reads and writes; saved whole in checkpoints."""

    step: jax.Array
    params: Any
    opt_state: Any
    # Non-trainable model variables by collection, e.g. {"router_state": {"bias": ...}} for loss-free balancing.
    model_state: Any = flax.struct.field(default_factory=dict)


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


def _adamw(train: TrainConfig, schedule) -> optax.GradientTransformation:
    return optax.adamw(schedule, b1=train.adam_b1, b2=train.adam_b2, weight_decay=train.weight_decay,
                       mask=_decay_mask)


def _param_group(path, _) -> str:
    names = [getattr(entry, "key", None) for entry in path]
    return "aux_router" if any(str(name).startswith("aux_router") for name in names) else "model"


def make_optimizer(train: TrainConfig, model: ModelConfig | None = None) -> optax.GradientTransformation:
    """Global-norm clipping followed by AdamW.

    With an auxiliary router (model.causality="aux_router": expert-choice MoR, or the Mixture-of-Depths predictor),
    its parameters get their own AdamW whose learning rate is model.aux_router_lr_multiplier times the schedule. They
    receive gradient only from their BCE loss, since their input is stop_gradient(h).
    """
    schedule = learning_rate_schedule(train)
    adamw = _adamw(train, schedule)
    if model is not None and model.kind in ("mor", "mod") and model.causality == "aux_router":
        multiplier = model.aux_router_lr_multiplier
        adamw = optax.multi_transform(
            {"model": adamw, "aux_router": _adamw(train, lambda step: multiplier * schedule(step))},
            lambda params: jax.tree_util.tree_map_with_path(_param_group, params),
        )
    clip = optax.clip_by_global_norm(train.grad_clip) if train.grad_clip > 0 else optax.identity()
    return optax.chain(clip, adamw)


def _init_boxed_state(model: LanguageModel, optimizer, rng, seq_len: int) -> TrainState:
    tokens = jnp.zeros((1, seq_len), jnp.int32)
    variables = dict(model.init(rng, tokens))
    params = variables.pop("params")
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                      model_state=variables)


def abstract_state(config: Config, model: LanguageModel, optimizer) -> TrainState:
    """Shapes, dtypes and logical axes of the train state, computed without allocating it."""
    init_seq = min(config.data.seq_len, 8)
    return jax.eval_shape(lambda rng: _init_boxed_state(model, optimizer, rng, init_seq), jax.random.key(0))


def state_shardings(config: Config, model, optimizer, mesh, rules) -> TrainState:
    """NamedSharding of every leaf of the (unboxed) train state; ConfigError if the mesh cannot shard a leaf evenly."""
    abstract = abstract_state(config, model, optimizer)
    check_divisible(abstract, mesh, rules)
    return shardings_for(abstract, mesh, rules)


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
