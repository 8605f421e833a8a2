"""Loss assembly and the jitted train and eval steps.

A batch is int32 [B, T + 1]: inputs are tokens[:, :-1], targets tokens[:, 1:]. Targets equal to the tokenizer's PAD
id carry no loss (validation batches are padded with whole PAD rows).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mor_jax.model import LanguageModel
from mor_jax.training.state import TrainState


def token_nll(logits, targets):
    """Negative log-likelihood of every target, float32 [B, T]."""
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)


def loss_and_metrics(model: LanguageModel, params, batch, pad_id: int, router_bce_coef: float):
    """Return (training loss, metrics). The loss is the mean LM NLL plus router_bce_coef times the router BCE."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    logits, aux = model.apply({"params": params}, inputs)
    weights = (targets != pad_id).astype(jnp.float32)
    nll = token_nll(logits, targets)
    tokens = jnp.maximum(jnp.sum(weights), 1.0)
    lm_loss = jnp.sum(nll * weights) / tokens
    loss = lm_loss + router_bce_coef * aux["router_bce"]
    metrics = {
        "loss": loss,
        "lm_loss": lm_loss,
        "router_bce": aux["router_bce"],
        "kept_fraction": aux["kept_fraction"],
        "mean_depth": jnp.sum(aux["depth"].astype(jnp.float32) * weights) / tokens,
    }
    return loss, metrics


def make_train_step(model: LanguageModel, optimizer, schedule, pad_id: int, router_bce_coef: float):
    """Return train_step(state, batch) -> (state, metrics), not yet jitted."""

    def train_step(state: TrainState, batch):
        grad_fn = jax.value_and_grad(
            functools.partial(loss_and_metrics, model, pad_id=pad_id, router_bce_coef=router_bce_coef),
            has_aux=True,
        )
        (_, metrics), grads = grad_fn(state.params, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), learning_rate=schedule(state.step))
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def jit_train_step(train_step, state_shardings, batch_sharding):
    """jit with explicit shardings; the incoming state is donated so its buffers are reused."""
    return jax.jit(
        train_step,
        in_shardings=(state_shardings, batch_sharding),
        out_shardings=(state_shardings, None),
        donate_argnums=(0,),
    )


def make_eval_step(model: LanguageModel, pad_id: int, token_bytes: np.ndarray):
    """Return eval_step(params, batch) -> summed statistics of one validation batch.

    Sums (not means) so batches of different fill add up exactly: `nll` in nats, `tokens` counted, `bytes` of text
    the targets stand for (for bits per byte), `kept` tokens per recursion, `depth` summed over tokens, and
    `agreement` per recursion between the causal rule sigmoid(logit) >= 0.5 and top-k membership over candidates.
    """
    byte_table = jnp.asarray(token_bytes, jnp.float32)

    def eval_step(params, batch):
        inputs, targets = batch[:, :-1], batch[:, 1:]
        logits, aux = model.apply({"params": params}, inputs)
        weights = (targets != pad_id).astype(jnp.float32)
        nll = token_nll(logits, targets)
        padded_table = jnp.zeros((logits.shape[-1],), jnp.float32).at[: byte_table.shape[0]].set(byte_table)
        stats = {
            "nll": jnp.sum(nll * weights),
            "tokens": jnp.sum(weights),
            "bytes": jnp.sum(padded_table[targets] * weights),
            "depth": jnp.sum(aux["depth"].astype(jnp.float32) * weights),
        }
        if "kept" in aux:
            kept = aux["kept"]
            candidates = jnp.concatenate([jnp.ones_like(kept[:1]), kept[:-1]], axis=0)
            agree = (aux["router_logits"] >= 0.0) == kept
            row_weights = weights[None]
            stats["kept"] = jnp.sum(kept * row_weights, axis=(1, 2))
            stats["agreement"] = jnp.sum(agree * candidates * row_weights, axis=(1, 2))
            stats["candidates"] = jnp.sum(candidates * row_weights, axis=(1, 2))
        return stats

    return eval_step
