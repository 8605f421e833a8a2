"""The training loop behind `train.py`: data, sharded state, jitted steps, logging, validation and checkpoints.

`train(config)` is what the CLI calls; a notebook calls it the same way and gets the final metrics back.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import signal
import tempfile
import threading
import time

import jax
import numpy as np
from tqdm.auto import tqdm

from mor_jax.config import Config, ConfigError, MorJaxError
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
from mor_jax.training.flops import forward_flops, peak_flops_per_device
from mor_jax.training.mesh import batch_sharding, data_parallel_size, logical_rules, make_mesh
from mor_jax.training.state import (
    abstract_state,
    count_params,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from mor_jax.training.steps import jit_train_step, make_eval_step, make_train_step, skip_nonfinite_updates

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
            path = os.path.join(run_dir, "metrics.jsonl")
            partial = _ends_with_partial_line(path)
            self.jsonl = open(path, "a", encoding="utf-8")
            if partial:
                # A process killed while writing left half a line; end it so the next record starts on its own line.
                logger.warning("%s ends with an incomplete line from an interrupted run; it is kept and ended", path)
                self.jsonl.write("\n")

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


def _ends_with_partial_line(path: str) -> bool:
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() == 0:
                return False
            handle.seek(-1, os.SEEK_END)
            return handle.read(1) != b"\n"
    except FileNotFoundError:
        return False


class TrainingStopped(MorJaxError):
    """A run ended by its train.nonfinite policy. Checkpoints hold only states from before the non-finite step."""


class NonFiniteSteps:
    """Apply train.nonfinite to the steps that `skip_nonfinite_updates` flagged, counting the skipped ones."""

    def __init__(self, train_config):
        self.policy = train_config.nonfinite
        self.limit = train_config.max_nonfinite_steps
        self.count = 0

    def check(self, step: int, metrics: dict, last_checkpoint: int | None) -> None:
        """Log a skipped step, or raise TrainingStopped when the policy is "stop" or the limit is reached."""
        if not int(metrics["nonfinite"]):
            return
        self.count += 1
        values = f"loss={float(metrics['loss'])}, grad_norm={float(metrics['grad_norm'])}"
        if last_checkpoint is None:
            saved = "no checkpoint was written"
        else:
            saved = f"the latest checkpoint is step {last_checkpoint}"
        if self.policy == "stop":
            raise TrainingStopped(
                f"step {step} has a non-finite loss, gradient or update ({values}) and train.nonfinite=stop, so the "
                f"run stopped without saving it; {saved}. Check the data and train.learning_rate, or set "
                f"train.nonfinite=skip"
            )
        if self.count >= self.limit:
            raise TrainingStopped(
                f"{self.count} steps had a non-finite loss, gradient or update, the last at step {step} ({values}), "
                f"which reaches train.max_nonfinite_steps={self.limit}, so the run stopped; {saved}. Check the data "
                f"and train.learning_rate, or raise train.max_nonfinite_steps"
            )
        logger.warning(
            "step %d: non-finite loss, gradient or update (%s); skipped the update and kept the previous parameters "
            "(%d of train.max_nonfinite_steps=%d)", step, values, self.count, self.limit,
        )


class PreemptionSignal:
    """Context manager that records SIGTERM, the preemption notice of Cloud TPU, instead of dying on it.

    The training loop checks `received` between steps, saves a checkpoint and exits normally. The previous handler
    is restored on exit. Nothing is installed outside the main thread (Python allows signal handlers only there)
    or in multi-process runs. There JAX's preemption service handles SIGTERM, and the loop calls
    `CheckpointManager.reached_preemption` to find the step all processes agree on.
    """

    def __init__(self):
        self.received: str | None = None
        self._previous = None

    def __enter__(self) -> "PreemptionSignal":
        if threading.current_thread() is threading.main_thread() and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def _record(self, signum, frame) -> None:
        self.received = signal.Signals(signum).name

    def __exit__(self, *exc_info) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def prepare_run_dir(run_dir: str) -> None:
    """Create the run directory and check that a file can be created in it."""
    try:
        os.makedirs(run_dir, exist_ok=True)
    except OSError as error:
        raise ConfigError(f"cannot create train.run_dir={run_dir}: {error.strerror}; choose another directory")
    # A real write, because os.access reports every path as writable to root and ignores read-only mounts.
    try:
        with tempfile.TemporaryFile(dir=run_dir):
            pass
    except OSError as error:
        raise ConfigError(f"train.run_dir={run_dir} is not writable ({error.strerror}); choose another "
                          f"directory") from None


def check_vocab(config: Config, tokenizer) -> None:
    needed = padded_vocab_size(tokenizer)
    if config.model.vocab_size < tokenizer.vocab_size:
        raise ConfigError(
            f"model.vocab_size={config.model.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size} "
            f"ids; set model.vocab_size={needed}"
        )


def apply_flop_budget(config: Config) -> Config:
    """Replace train.steps by the steps that spend train.flop_budget forward FLOPs (when the budget is set).

    Like the MoR paper, the budget counts forward FLOPs only: steps = budget / (forward FLOPs per sequence x
    data.batch_size), rounded down.
    """
    budget = config.train.flop_budget
    if not budget:
        return config
    per_step = forward_flops(config.model, config.data.seq_len) * config.data.batch_size
    steps = int(budget // per_step)
    if steps < 1:
        raise ConfigError(
            f"train.flop_budget={budget:.3g} is less than one step ({per_step:.3g} forward FLOPs for "
            f"data.batch_size={config.data.batch_size} rows of {config.data.seq_len} tokens); raise the budget"
        )
    logger.info("train.flop_budget=%.3g forward FLOPs at %.3g per step: %d steps", budget, per_step, steps)
    return dataclasses.replace(config, train=dataclasses.replace(config.train, steps=steps))


def throughput_metrics(config: Config, timed_tokens: int, timed_seconds: float) -> dict:
    """Achieved model FLOP/s (3x the analytic forward FLOPs, for forward and backward) and, where the device's
    peak is known, MFU against the peak of all devices."""
    if timed_seconds <= 0:
        return {"model_flops_per_second": float("nan")}
    sequences = timed_tokens / config.data.seq_len
    achieved = 3 * forward_flops(config.model, config.data.seq_len) * sequences / timed_seconds
    result = {"model_flops_per_second": achieved}
    peak = peak_flops_per_device(jax.devices()[0].device_kind)
    if peak:
        result["mfu"] = achieved / (peak * jax.device_count())
    return result


def train(config: Config) -> dict:
    """Train (or resume) the run described by `config` and return its final metrics.

    The returned dict has step, preempted, train_loss, val_loss, val_bits_per_byte, perplexity, mean_depth,
    kept_fraction_per_recursion, tokens_per_second, model_flops_per_second (and mfu where the device's peak is
    known), params, wall_seconds and run_dir. After SIGTERM the run saves a checkpoint at the current step and
    returns early with preempted=True and no validation figures. Raises TrainingStopped when train.nonfinite ends
    the run.
    """
    started = time.time()
    config = apply_flop_budget(config)
    cfg_t, cfg_d = config.train, config.data
    run_dir = os.path.abspath(cfg_t.run_dir)
    # Everything that can reject the input runs before the run directory is created or touched.
    scan = ckpt.check_resumable(run_dir, config)
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
    optimizer = make_optimizer(cfg_t, config.model)
    schedule = learning_rate_schedule(cfg_t)
    shardings = state_shardings(config, model, optimizer, mesh, rules)
    tokens_sharding = batch_sharding(mesh, rules)

    target = ckpt.abstract_target(abstract_state(config, model, optimizer), shardings)
    if scan.latest is not None:
        ckpt.check_state_matches(run_dir, scan.latest, target)

    prepare_run_dir(run_dir)
    ckpt.discard_interrupted(scan)
    manager = ckpt.make_manager(run_dir, keep=cfg_t.keep_checkpoints)
    latest = manager.latest_step()
    if latest is not None:
        state = ckpt.restore(manager, latest, target, iterator)
        logger.info("resumed %s from step %d, its latest complete checkpoint", run_dir, latest)
    else:
        if scan.interrupted:
            logger.info("%s has no complete checkpoint; starting from step 0", run_dir)
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
        skip_nonfinite_updates(make_train_step(model, optimizer, schedule, tokenizer.pad_id, cfg_t.microbatches)),
        shardings, tokens_sharding,
    )
    eval_step = jax.jit(make_eval_step(model, tokenizer.pad_id, tokenizer.token_byte_lengths()))
    metrics_log = MetricsLogger(run_dir, enabled=jax.process_index() == 0)

    def validate(step: int, max_batches: int) -> dict:
        result = evaluate_batches(eval_step, {"params": state.params, **state.model_state}, val_batches, tokens_sharding, max_batches)
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
    nonfinite = NonFiniteSteps(cfg_t)
    last_saved = latest  # newest checkpoint on disk or being written; None before the first

    def flush(entry):
        nonlocal last_train_loss
        step, metrics = entry
        host = jax.device_get(metrics)
        last_train_loss = float(host["loss"])
        if step % cfg_t.log_every == 0 or step == cfg_t.steps or host["nonfinite"]:
            metrics_log.log(step, "train", host)
            progress.set_postfix(loss=f"{last_train_loss:.3f}", refresh=False)
        nonfinite.check(step, host, last_saved)

    def flush_pending():
        nonlocal pending
        if pending is not None:
            entry, pending = pending, None
            flush(entry)

    def save_checkpoint(step):
        nonlocal last_saved
        # The newest step's metrics are fetched first, so a non-finite step stops a run before anything is saved.
        flush_pending()
        ckpt.save(manager, step, state, iterator)
        last_saved = step

    preempted = False
    try:
        with jax.set_mesh(mesh), PreemptionSignal() as preemption:
            for step in range(start_step + 1, cfg_t.steps + 1):
                # manager.reached_preemption is JAX's multi-host preemption sync point; it is False in a single
                # process, where PreemptionSignal records the signal instead.
                if preemption.received or manager.reached_preemption(step - 1):
                    preempted = True
                    break
                batch = next(iterator)["tokens"]
                batch = jax.make_array_from_process_local_data(tokens_sharding, batch)
                state, metrics = train_step(state, batch)
                flush_pending()
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
                    save_checkpoint(step)
            flush_pending()
            preempted = preempted or preemption.received is not None
            final_step = int(jax.device_get(state.step))
            if preempted and final_step not in (last_saved, start_step):
                save_checkpoint(final_step)
            jax.block_until_ready(state.params)
            if timer is not None:
                timed_seconds = time.perf_counter() - timer
            progress.close()

            if preempted:
                manager.wait_until_finished()
                notice = preemption.received or "preemption notice"
                if last_saved is None:
                    logger.info("%s received before the first step; nothing to save. Exiting", notice)
                else:
                    logger.info(
                        "%s received at step %d; checkpoint %d is complete in %s. Exiting; rerun the same command "
                        "to resume from it", notice, final_step, last_saved, ckpt.checkpoint_dir(run_dir),
                    )
                val_result = None
            else:
                val_result = validate(final_step, cfg_t.final_eval_batches)
    finally:
        # Also on errors: a save already started is finished, so the newest complete checkpoint is on disk.
        progress.close()
        manager.wait_until_finished()
        manager.close()
        metrics_log.close()

    result = {
        "step": final_step,
        "preempted": preempted,
        "train_loss": last_train_loss,
        **{k: v for k, v in (val_result or {}).items() if k != "val_tokens"},
        "tokens_per_second": timed_tokens / timed_seconds if timed_seconds > 0 else float("nan"),
        **throughput_metrics(config, timed_tokens, timed_seconds),
        "params": n_params,
        "wall_seconds": time.time() - started,
        "run_dir": run_dir,
    }
    losses = [result["train_loss"], result.get("val_loss")]
    if not all(math.isfinite(v) for v in losses if isinstance(v, float)):
        logger.warning("non-finite loss at the end of training: %s", result)
    return result
