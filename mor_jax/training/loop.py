"""The training loop behind `train.py`: data, sharded state, jitted steps, logging, validation and checkpoints.

`train(config)` is what the CLI calls; a notebook calls it the same way and gets the final metrics back.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mor_jax.config import Config, ConfigError
from mor_jax.data import (
    DataError,
    load_documents,
    make_tokenizer,
    make_train_dataset,
    make_val_batches,
    pack_documents,
    padded_vocab_size,
)
from mor_jax.model import build_model
from mor_jax.training import checkpoint as ckpt
from mor_jax.training.evaluation import evaluate_batches
from mor_jax.training.mesh import batch_sharding, data_parallel_size, logical_rules, make_mesh
from mor_jax.training.state import (
    abstract_state,
    count_params,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from mor_jax.training.steps import jit_train_step, make_eval_step, make_train_step

logger = logging.getLogger(__name__)


class MetricsLogger:
    """Writes scalars to TensorBoard and metrics.jsonl in the run directory (process 0 only)."""

    def __init__(self, run_dir: str, enabled: bool):
        self.enabled = enabled
        self.writer = None
        self.jsonl = None
        if enabled:
            from tensorboardX import SummaryWriter

            self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            self.jsonl = open(os.path.join(run_dir, "metrics.jsonl"), "a", encoding="utf-8")

    def log(self, step: int, prefix: str, metrics: dict) -> None:
        if not self.enabled:
            return
        flat = {}
        for key, value in metrics.items():
            value = np.asarray(value)
            if value.ndim == 0:
                flat[f"{prefix}/{key}"] = float(value)
            else:
                for i, item in enumerate(value.reshape(-1)):
                    flat[f"{prefix}/{key}_{i}"] = float(item)
        for key, value in flat.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **flat}) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()


def prepare_run_dir(run_dir: str) -> None:
    """Create the run directory and check that it is writable."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create train.run_dir={run_dir}: {error.strerror}; choose another directory")
    if not os.access(run_dir, os.W_OK):
        raise ConfigError(f"train.run_dir={run_dir} is not writable; choose another directory")


def check_vocab(config: Config, tokenizer) -> None:
    needed = padded_vocab_size(tokenizer)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"ids; set model.vocab_size={needed}"
        )


def train(config: Config) -> dict:
    """Train (or resume) the run described by `config` and return its final metrics.

    The returned dict has step, train_loss, val_loss, val_bits_per_byte, perplexity, mean_depth,
    kept_fraction_per_recursion, tokens_per_second, params, wall_seconds and run_dir.
    """
    started = time.time()
    cfg_t, cfg_d = config.train, config.data
    run_dir = os.path.abspath(cfg_t.run_dir)
    # Everything that can reject the input runs before the run directory is created or touched.
    ckpt.check_resumable(run_dir, config)
    tokenizer = make_tokenizer(cfg_d)
    check_vocab(config, tokenizer)
    train_docs, val_docs = load_documents(cfg_d)
    train_rows = pack_documents(train_docs, tokenizer, cfg_d.seq_len)
    val_rows = pack_documents(val_docs, tokenizer, cfg_d.seq_len)
    if len(val_rows) == 0:
        raise DataError(
            f"the validation documents hold fewer than data.seq_len + 1 = {cfg_d.seq_len + 1} tokens; add validation "
            f"text or lower data.seq_len"
        )

    mesh = make_mesh(config.mesh)
    rules = logical_rules(config.mesh)
    dp = data_parallel_size(mesh, rules)
    if cfg_d.batch_size % dp:
        raise ConfigError(
            f"data.batch_size={cfg_d.batch_size} is not divisible by the data-parallel size {dp} "
            f"(mesh data x fsdp); use a multiple of {dp}"
        )
    dataset = make_train_dataset(cfg_d, train_rows, jax.process_index(), jax.process_count())
    iterator = iter(dataset)
    val_batches = make_val_batches(cfg_d, val_rows)

    model = build_model(config.model)
    optimizer = make_optimizer(cfg_t)
    schedule = learning_rate_schedule(cfg_t)
    shardings = state_shardings(config, model, optimizer, mesh, rules)
    tokens_sharding = batch_sharding(mesh, rules)

    prepare_run_dir(run_dir)
    manager = ckpt.make_manager(run_dir, keep=cfg_t.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        target = ckpt.abstract_target(abstract_state(config, model, optimizer), shardings)
        state = ckpt.restore(manager, latest, target, iterator)
        logger.info("resumed %s from step %d", run_dir, latest)
    else:
        state = create_train_state(config, model, optimizer, mesh, rules)
    if jax.process_index() == 0:
        ckpt.write_config(run_dir, config)
    start_step = int(jax.device_get(state.step))
    n_params = count_params(state.params)
    logger.info(
        "%s model, %d parameters, mesh %s; %d training rows and %d validation rows of %d tokens; step %d of %d",
        config.model.kind, n_params, dict(mesh.shape), len(train_rows), len(val_rows), cfg_d.seq_len, start_step,
        cfg_t.steps,
    )

    train_step = jit_train_step(
        make_train_step(model, optimizer, schedule, tokenizer.pad_id, config.model.router_bce_coef),
        shardings, tokens_sharding,
    )
    eval_step = jax.jit(make_eval_step(model, tokenizer.pad_id, tokenizer.token_byte_lengths()))
    metrics_log = MetricsLogger(run_dir, enabled=jax.process_index() == 0)

    def validate(step: int, max_batches: int) -> dict:
        result = evaluate_batches(eval_step, state.params, val_batches, tokens_sharding, max_batches)
        metrics_log.log(step, "val", {k: v for k, v in result.items() if k != "val_tokens"})
        return result

    progress = tqdm(
        total=cfg_t.steps, initial=start_step, desc="train", unit="step",
        disable=not cfg_t.progress_bar or jax.process_index() != 0,
        dynamic_ncols=True,
    )
    pending = None  # (step, metrics) of the previous step, fetched once the next step is dispatched
    last_train_loss = float("nan")
    val_result = None
    timed_tokens, timed_seconds, timer = 0, 0.0, None
    tokens_per_step = cfg_d.batch_size * cfg_d.seq_len

    def flush(entry):
        nonlocal last_train_loss
        step, metrics = entry
        host = jax.device_get(metrics)
        last_train_loss = float(host["loss"])
        if step % cfg_t.log_every == 0 or step == cfg_t.steps:
            metrics_log.log(step, "train", host)
            progress.set_postfix(loss=f"{last_train_loss:.3f}", refresh=False)

    with jax.set_mesh(mesh):
        for step in range(start_step + 1, cfg_t.steps + 1):
            batch = next(iterator)["tokens"]
            batch = jax.make_array_from_process_local_data(tokens_sharding, batch)
            state, metrics = train_step(state, batch)
            if pending is not None:
                flush(pending)
            pending = (step, metrics)
            progress.update(1)

            # The first step compiles; throughput is measured from the end of it.
            if timer is None:
                jax.block_until_ready(state.step)
                timer = time.perf_counter()
            else:
                timed_tokens += tokens_per_step

            if cfg_t.eval_every and step % cfg_t.eval_every == 0 and step != cfg_t.steps:
                val_result = validate(step, cfg_t.eval_batches)
                progress.write(f"step {step}: val_loss {val_result['val_loss']:.4f} "
                               f"bits/byte {val_result['val_bits_per_byte']:.4f}")
            if step % cfg_t.checkpoint_every == 0 or step == cfg_t.steps:
                ckpt.save(manager, step, state, iterator)
        if pending is not None:
            flush(pending)
        jax.block_until_ready(state.params)
        if timer is not None:
            timed_seconds = time.perf_counter() - timer
        progress.close()

        final_step = int(jax.device_get(state.step))
        val_result = validate(final_step, cfg_t.final_eval_batches)
    manager.wait_until_finished()
    manager.close()
    metrics_log.close()

    result = {
        "step": final_step,
        "train_loss": last_train_loss,
        **{k: v for k, v in val_result.items() if k != "val_tokens"},
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds > 0 else float("nan"),
        "params": n_params,
        "wall_seconds": time.time() - started,
        "run_dir": run_dir,
    }
    if not all(math.isfinite(v) for v in (result["train_loss"], result["val_loss"]) if isinstance(v, float)):
        logger.warning("non-finite loss at the end of training: %s", result)
    return result
