"""Loss assembly and the jitted train and eval steps.

A batch is int32 [B, T + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:]. Targets equal to the tokenizer's PAD
id carry no loss (validation batches are padded with whole PAD rows).

The training loss is the mean LM NLL plus the model's `router_loss` (the router's weighted auxiliary losses: BCE and
z-loss for expert-choice, balancing and z-loss for token-choice).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mor_jax.model import LanguageModel
from mor_jax.model.routing import loss_free_bias_update, warmup_capacities
from mor_jax.training.state import TrainState

# Router statistics copied from the model's aux into the training metrics when present.
ROUTER_METRICS = ("router_bce", "router_z_loss", "balance_loss", "depth_fraction", "max_violation", "router_entropy",
                  "execution_rate", "rate_loss")


def token_nll(logits, targets):
    """Negative log-likelihood of every target, float32 [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def model_capacities(model: LanguageModel, step):
    """Expert-choice capacities at optimizer step `step` (capacity warm-up), or None when they are fixed."""
    config = model.config
    if config.kind == "mor" and config.routing == "expert_choice" and config.capacity_warmup_steps:
        return warmup_capacities(config, step)
    return None


def loss_and_metrics(model: LanguageModel, params, model_state, batch, pad_id: int, step=None, token_count=None,
                     router_scale: float = 1.0):
    """Return (training loss, (metrics, aux)) for one batch.

    For a micro-batch, `token_count` is the non-PAD target count of the whole batch and `router_scale` is
    1 / micro-batches. Then the losses of all micro-batches, and their loss, lm_loss and mean_depth metrics, add up
    to those of the whole batch.
    """
    inputs, targets = batch[:, :-1], batch[:, 1:]
    capacities = None if step is None else model_capacities(model, step)
    logits, aux = model.apply({"params": params, **model_state}, inputs, capacities=capacities)
    weights = (targets != pad_id).astype(jnp.float32)
    nll = token_nll(logits, targets)
    tokens = jnp.maximum(jnp.sum(weights), 1.0) if token_count is None else token_count
    lm_loss = jnp.sum(nll * weights) / tokens
    loss = lm_loss + aux["router_loss"] if token_count is None else lm_loss + router_scale * aux["router_loss"]
    metrics = {
        "loss": loss,
        "lm_loss": lm_loss,
        "router_loss": aux["router_loss"],
        "kept_fraction": aux["kept_fraction"],
        "mean_depth": jnp.sum(aux["depth"].astype(jnp.float32) * weights) / tokens,
    }
    metrics.update({key: aux[key] for key in ROUTER_METRICS if key in aux})
    return loss, (metrics, aux)


# Metrics that micro-batches contribute to additively (see loss_and_metrics); the others are averaged.
_ADDITIVE_METRICS = ("loss", "lm_loss", "mean_depth")


def split_microbatches(batch, microbatches: int):
    """Reshape [B, T + 1] to [microbatches, B / microbatches, T + 1], micro-batch m holding rows m, m + M, ....

    Strided rows keep every micro-batch spread over all data-parallel shards of a batch split into contiguous
    blocks of rows (when each block's row count is a multiple of M).
    """
    rows, width = batch.shape
    return batch.reshape(rows // microbatches, microbatches, width).swapaxes(0, 1)


def accumulated_gradients(model: LanguageModel, params, model_state, batch, pad_id: int, step, microbatches: int):
    """Return (metrics, aux, grads) of a batch computed as `microbatches` micro-batches in a lax.scan.

    The gradients are summed in float32. The LM loss of every micro-batch is divided by the non-PAD targets of the
    whole batch, and its router loss by the micro-batch count, so the sum is the whole batch's loss. aux keeps only
    `depth_load`, summed, for loss-free balancing.
    """
    targets = batch[:, 1:]
    token_count = jnp.maximum(jnp.sum((targets != pad_id).astype(jnp.float32)), 1.0)
    grad_fn = jax.value_and_grad(loss_and_metrics, argnums=1, has_aux=True)

    def accumulate(grads, micro_batch):
        (_, (metrics, aux)), micro_grads = grad_fn(model, params, model_state, micro_batch, pad_id, step, token_count,
                                                   1.0 / microbatches)
        grads = jax.tree_util.tree_map(jnp.add, grads, micro_grads)
        return grads, (metrics, {key: aux[key] for key in ("depth_load",) if key in aux})

    zeros = jax.tree_util.tree_map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    grads, (stacked, stacked_aux) = jax.lax.scan(accumulate, zeros, split_microbatches(batch, microbatches))
    # NOTE: averaged router statistics (max_violation, router_entropy, ...) are means of per-micro-batch values, not
    # the whole batch's values. Only the additive metrics and the losses are exact.
    metrics = {key: jnp.sum(value, axis=0) if key in _ADDITIVE_METRICS else jnp.mean(value, axis=0)
               for key, value in stacked.items()}
    aux = {key: jnp.sum(value, axis=0) for key, value in stacked_aux.items()}
    return metrics, aux, grads


def make_train_step(model: LanguageModel, optimizer, schedule, pad_id: int, microbatches: int = 1):
    """Return train_step(state, batch) -> (state, metrics), not yet jitted.

    With microbatches > 1 the batch is split into that many micro-batches whose gradients are accumulated before
    the single optimizer update (see `accumulated_gradients`).
    """
    config = model.config

    def train_step(state: TrainState, batch):
        if microbatches == 1:
            grad_fn = jax.value_and_grad(loss_and_metrics, argnums=1, has_aux=True)
            (_, (metrics, aux)), grads = grad_fn(model, state.params, state.model_state, batch, pad_id, state.step)
        else:
            metrics, aux, grads = accumulated_gradients(model, state.params, state.model_state, batch, pad_id,
                                                        state.step, microbatches)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        model_state = state.model_state
        if "router_state" in model_state:
            # Loss-free balancing: the bias moves once per optimizer step, outside the optimizer.
            router_state = jax.tree_util.tree_map(
                lambda bias: loss_free_bias_update(bias, aux["depth_load"], config.bias_update_rate),
                model_state["router_state"],
            )
            model_state = dict(model_state, router_state=router_state)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state, model_state=model_state), metrics

    return train_step


def _all_finite(tree) -> jax.Array:
    """Return a scalar bool: True when no floating-point leaf of `tree` contains NaN or infinity."""
    flags = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(tree)
             if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack(flags)) if flags else jnp.array(True)


def skip_nonfinite_updates(train_step):
    """Wrap train_step(state, batch) so that a step with a non-finite result leaves the state as it was.

    A step is non-finite when its loss or gradient norm, or any leaf of the state it computes (parameters, optimizer
    moments, model state), contains NaN or infinity. The wrapped step then returns the parameters, optimizer state and
    model state it was given, still advancing `step` because the batch was consumed, and sets the metric
    `nonfinite` to 1. The choice is a `jnp.where` on every leaf inside the jitted step, so a finite step returns
    exactly the values of the unwrapped one. optax.apply_if_finite is not used: it checks the gradients only, so an
    infinite learning rate or an overflowing second moment would pass, and it applies the update anyway after its
    limit.
    """

    def guarded_step(state: TrainState, batch):
        new_state, metrics = train_step(state, batch)
        finite = (jnp.isfinite(metrics["loss"]) & jnp.isfinite(metrics["grad_norm"])
                  & _all_finite((new_state.params, new_state.opt_state, new_state.model_state)))
        kept = jax.tree_util.tree_map(lambda new, old: jnp.where(finite, new, old), new_state, state)
        kept = kept.replace(step=new_state.step)
        return kept, dict(metrics, nonfinite=jnp.logical_not(finite).astype(jnp.int32))

    return guarded_step


def jit_train_step(train_step, state_shardings, batch_sharding):
    """jit with explicit shardings; the incoming state is donated so its buffers are reused."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(model: LanguageModel, pad_id: int, token_bytes: np.ndarray):
    """Return eval_step(variables, batch) -> summed statistics of one validation batch.

    Sums (not means) so batches of different fill add up exactly: `nll` in nats, `tokens` counted, `bytes` of text
    the targets stand for (for bits per byte), `depth` summed over tokens, `dead` tokens that received at most one
    recursion, and for recursive models `kept` tokens per recursion (per routed layer or layer for the peer
    systems). Expert-choice and Mixture-of-Depths add `agreement` per recursion or routed layer between the
    decoding rule (logit >= 0) and top-k membership, over `candidates`; token-choice adds `depth_load`.
    """
    byte_table = jnp.asarray(token_bytes, jnp.float32)
    config = model.config

    def eval_step(variables, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = model.apply(variables, inputs)
        weights = (targets != pad_id).astype(jnp.float32)
        nll = token_nll(logits, targets)
        padded_table = jnp.zeros((logits.shape[-1],), jnp.float32).at[: byte_table.shape[0]].set(byte_table)
        depth = aux["depth"].astype(jnp.float32)
        stats = {
            "nll": jnp.sum(nll * weights),
            "tokens": jnp.sum(weights),
            "bytes": jnp.sum(padded_table[targets] * weights),
            "depth": jnp.sum(depth * weights),
        }
        if "kept" in aux:
            row_weights = weights[None]
            stats["kept"] = jnp.sum(aux["kept"] * row_weights, axis=(1, 2))
            stats["dead"] = jnp.sum((depth <= 1) * weights)
        if config.kind == "mod" or (config.kind == "mor" and config.routing == "expert_choice"):
            kept = aux["kept"]
            if config.kind == "mod":
                candidates = jnp.ones_like(kept)  # every routed layer chooses among all tokens
            else:
                candidates = jnp.concatenate([jnp.ones_like(kept[:1]), kept[:-1]], axis=0)
            agree = (aux["router_logits"] >= 0.0) == kept
            stats["agreement"] = jnp.sum(agree * candidates * weights[None], axis=(1, 2))
            stats["candidates"] = jnp.sum(candidates * weights[None], axis=(1, 2))
        if config.kind == "mor" and config.routing == "token_choice":
            depth_index = aux["depth"] - 1
            one_hot = jax.nn.one_hot(depth_index, config.num_recursions, dtype=jnp.float32)
            stats["depth_load"] = jnp.sum(one_hot * weights[..., None], axis=(0, 1))
            probs = jax.nn.softmax(aux["router_logits"], axis=-1)
            entropy = -jnp.sum(probs * jnp.log(jnp.maximum(probs, 1e-9)), axis=-1)
            stats["entropy"] = jnp.sum(entropy * weights)
        return stats

    return eval_step
