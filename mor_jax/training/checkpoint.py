"""Orbax checkpoints of the train state and the data iterator position, plus the run's config.yaml.

Layout of a run directory:

    run_dir/config.yaml          the config the run was started with
    run_dir/checkpoints/<step>/  one Orbax checkpoint per saved step: items "state" and "data"

Orbax writes each step into a temporary directory and renames it when complete, so an interrupted save is never
listed as a checkpoint.
"""

from __future__ import annotations

import dataclasses
import logging
import os

import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from mor_jax.config import Config, ConfigError, load_config, save_config
from mor_jax.data import iterator_restore_args, iterator_save_args

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(os.path.abspath(run_dir), CHECKPOINT_DIR)


def make_manager(run_dir: str, keep: int = 3, read_only: bool = False) -> ocp.CheckpointManager:
    """Open (or create) the Orbax CheckpointManager of a run directory."""
    if read_only:
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None, save_interval_steps=0, create=False, read_only=True
        )
    else:
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_names=("state", "data"))


def abstract_target(abstract, shardings):
    """ShapeDtypeStructs carrying the target shardings, for restoring straight into a (possibly new) mesh."""
    return jax.tree_util.tree_map(
        lambda leaf, sharding: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding),
        nn.unbox(abstract), shardings,
    )


def save(manager: ocp.CheckpointManager, step: int, state, iterator=None, force: bool = False) -> bool:
    """Start an asynchronous save of `state` (and the data iterator position) at `step`."""
    items = {"state": ocp.args.StandardSave(state)}
    if iterator is not None:
        items["data"] = iterator_save_args(iterator)
    return manager.save(step, args=ocp.args.Composite(**items), force=force)


def restore(manager: ocp.CheckpointManager, step: int, target, iterator=None):
    """Restore the state at `step` into the shardings of `target`; also moves `iterator` to the saved position."""
    items = {"state": ocp.args.StandardRestore(target)}
    if iterator is not None:
        items["data"] = iterator_restore_args(iterator)
    restored = manager.restore(step, args=ocp.args.Composite(**items))
    return restored["state"]


def model_mismatches(saved: Config, current: Config) -> list[str]:
    """List `model.<field>: saved=… current=…` for every model field that differs."""
    diffs = []
    for field in dataclasses.fields(saved.model):
        old, new = getattr(saved.model, field.name), getattr(current.model, field.name)
        if old != new:
            diffs.append(f"model.{field.name}: checkpoint={old!r} current={new!r}")
    return diffs


def check_resumable(run_dir: str, config: Config) -> None:
    """Raise ConfigError if the run directory was started with a different model shape."""
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        return
    saved = load_config(path)
    diffs = model_mismatches(saved, config)
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoints were written with a different model ("
            + "; ".join(diffs) + "). Use a new train.run_dir or the original model settings."
        )


def write_config(run_dir: str, config: Config) -> None:
    """Write config.yaml atomically (a temporary file renamed over the old one)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    tmp = path + ".tmp"
    save_config(config, tmp)
    os.replace(tmp, path)
