"""Orbax checkpoints of the train state and the data iterator position, plus the run's config.yaml.

Layout of a run directory:

    run_dir/config.yaml          the config the run was started with
    run_dir/checkpoints/<step>/  one Orbax checkpoint per saved step: items "state" and "data"

Orbax 0.12.8 writes each step into `checkpoints/<step>.orbax-checkpoint-tmp`, writes `commit_success.txt` into it
when every item is on disk, and then renames it to `checkpoints/<step>`. A process killed during a save leaves the
temporary directory behind. `scan_checkpoints` sorts the entries of `checkpoints/` into complete steps, interrupted
saves and entries that mor_jax never writes. Interrupted saves are temporary directories, and step directories
without the commit file or without one of the items, which a non-atomic file system or a kill while Orbax deletes
an old step can leave. Training discards the interrupted saves and resumes from the latest complete step. It
rejects foreign entries, leaving them untouched.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil

import flax.linen as nn
import jax
import orbax.checkpoint as ocp
from etils import epath

from mor_jax.config import Config, ConfigError, load_config, save_config
from mor_jax.data import iterator_restore_args, iterator_save_args

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.yaml"
CHECKPOINT_DIR = "checkpoints"
# Items of every checkpoint: the TrainState and the grain iterator position.
ITEM_NAMES = ("state", "data")
# Orbax's marker of a finished save, and the suffix of the directory a save is written into before its rename.
COMMIT_FILE = ocp.path.atomicity_types.COMMIT_SUCCESS_FILE
TMP_SUFFIX = ocp.path.step.TMP_DIR_SUFFIX
_STEP_NAME = re.compile(r"\d+")
_TMP_NAME = re.compile(r"(\d+)" + re.escape(TMP_SUFFIX) + r".*")
# Mismatched leaves listed in full by `check_state_matches`; the rest are counted.
_MAX_LISTED = 12


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
    return ocp.CheckpointManager(checkpoint_dir(run_dir), options=options, item_names=ITEM_NAMES)


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


@dataclasses.dataclass
class CheckpointScan:
    """The entries of a run's checkpoints/ directory, sorted by what they are."""

    # Steps whose save finished, ascending.
    complete: list[int]
    # (step, path) of saves that never finished: temporary directories and uncommitted or partial step directories.
    interrupted: list[tuple[int, str]]

    @property
    def latest(self) -> int | None:
        return self.complete[-1] if self.complete else None


def _declared_items(step_path: str) -> set[str]:
    """Return the items Orbax's step metadata lists (none when the metadata is missing or unreadable)."""
    try:
        metadata = ocp.metadata.get_step_metadata(epath.Path(step_path))
    except (ValueError, OSError):
        return set()
    return set(metadata.item_handlers or {})


def scan_checkpoints(run_dir: str) -> CheckpointScan:
    """Sort the entries of `run_dir/checkpoints`; raise ConfigError if any was not written by mor_jax."""
    directory = checkpoint_dir(run_dir)
    if not os.path.lexists(directory):
        return CheckpointScan(complete=[], interrupted=[])
    if not os.path.isdir(directory):
        raise ConfigError(f"{directory} is not a directory, so {run_dir} is not a mor_jax run directory; use a new "
                          f"train.run_dir")

    complete, interrupted, foreign = [], [], []
    for entry in sorted(os.scandir(directory), key=lambda item: item.name):
        if entry.is_dir(follow_symlinks=False) and _TMP_NAME.fullmatch(entry.name):
            interrupted.append((int(_TMP_NAME.fullmatch(entry.name).group(1)), entry.path))
            continue
        if not (entry.is_dir(follow_symlinks=False) and _STEP_NAME.fullmatch(entry.name)):
            foreign.append(entry.name)
            continue
        item_dirs = {item.name for item in os.scandir(entry.path) if item.is_dir()}
        items = item_dirs | _declared_items(entry.path)
        if items - set(ITEM_NAMES):
            foreign.append(f"{entry.name} (items {', '.join(sorted(items))}; mor_jax writes {', '.join(ITEM_NAMES)})")
        elif os.path.isfile(os.path.join(entry.path, COMMIT_FILE)) and item_dirs == set(ITEM_NAMES):
            complete.append(int(entry.name))
        else:
            interrupted.append((int(entry.name), entry.path))

    if foreign:
        listed = "; ".join(foreign[:5]) + (f"; and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise ConfigError(f"{directory} contains entries that mor_jax does not write: {listed}. It may belong to "
                          f"another program; use a new train.run_dir or move those entries out")
    return CheckpointScan(complete=sorted(complete), interrupted=sorted(interrupted))


def model_mismatches(saved: Config, current: Config) -> list[str]:
    """List `model.<field>: checkpoint=… current=…` for every model field that differs."""
    diffs = []
    for field in dataclasses.fields(saved.model):
        old, new = getattr(saved.model, field.name), getattr(current.model, field.name)
        if old != new:
            diffs.append(f"model.{field.name}: checkpoint={old!r} current={new!r}")
    return diffs


def check_resumable(run_dir: str, config: Config) -> CheckpointScan:
    """Check, without writing anything, that `config` can train in `run_dir`, and return its checkpoint scan.

    Raises ConfigError if run_dir is not a directory, if checkpoints/ contains entries mor_jax does not write, if there
    are checkpoints but no readable config.yaml, or if config.yaml has a different model.
    """
    if os.path.lexists(run_dir) and not os.path.isdir(run_dir):
        raise ConfigError(f"train.run_dir={run_dir} exists and is not a directory; choose another train.run_dir")
    scan = scan_checkpoints(run_dir)
    path = os.path.join(run_dir, CONFIG_FILE)
    if not os.path.exists(path):
        if scan.complete or scan.interrupted:
            raise ConfigError(
                f"cannot resume {run_dir}: it has checkpoints but no {CONFIG_FILE}, so the model they were written "
                f"with is unknown. Restore {path} or use a new train.run_dir"
            )
        return scan
    try:
        saved = load_config(path)
    except ConfigError as error:
        raise ConfigError(
            f"cannot resume {run_dir}: its {CONFIG_FILE} is invalid ({error}). Restore the file or use a new "
            f"train.run_dir"
        ) from None
    diffs = model_mismatches(saved, config)
    if diffs:
        raise ConfigError(
            f"cannot resume {run_dir}: its checkpoints were written with a different model ("
            + "; ".join(diffs) + "). Use a new train.run_dir or the original model settings."
        )
    changes = setting_changes(saved, config)
    if changes and (scan.complete or scan.interrupted):
        # Allowed, e.g. more train.steps, but data settings change which rows the restored data position selects.
        logger.warning("resuming %s with settings that differ from its %s: %s", run_dir, CONFIG_FILE,
                       "; ".join(changes))
    return scan


def setting_changes(saved: Config, current: Config) -> list[str]:
    """List `<section>.<field>: saved -> current` for every data, train and mesh field that differs.

    train.run_dir is left out: the same directory may be given as another (relative or absolute) path.
    """
    changes = []
    for section in ("data", "train", "mesh"):
        old_section, new_section = getattr(saved, section), getattr(current, section)
        for field in dataclasses.fields(old_section):
            old, new = getattr(old_section, field.name), getattr(new_section, field.name)
            if old != new and (section, field.name) != ("train", "run_dir"):
                changes.append(f"{section}.{field.name}: {old!r} -> {new!r}")
    return changes


def _leaf_key(path) -> tuple[str, ...]:
    """Spell a pytree key path the same way for a TrainState and for Orbax's metadata tree of it."""
    parts = []
    for entry in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(entry, attribute):
                parts.append(str(getattr(entry, attribute)))
                break
        else:
            parts.append(str(entry))
    return tuple(parts)


def check_state_matches(run_dir: str, step: int, target) -> None:
    """Raise ConfigError unless the saved state of `step` has the leaves, shapes and dtypes of `target`.

    Reads only Orbax's metadata of the "state" item, so a mismatch is reported before anything is restored or
    written. This catches a config.yaml that no longer describes its checkpoints.
    """
    state_path = epath.Path(checkpoint_dir(run_dir)) / str(step) / "state"
    handler = ocp.StandardCheckpointHandler()
    try:
        metadata = handler.metadata(state_path)
    except (ValueError, OSError, KeyError) as error:
        raise ConfigError(f"cannot read the state metadata of checkpoint {state_path} ({error}); the checkpoint "
                          f"is damaged: move that step directory out to resume from an earlier one") from None
    finally:
        handler.close()

    saved = {_leaf_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(metadata)}
    wanted = {_leaf_key(path): leaf for path, leaf in jax.tree_util.tree_leaves_with_path(target)}
    problems = []
    # Parameters first: their names are the ones a reader recognises.
    for key in sorted(saved.keys() | wanted.keys(), key=lambda key: (key[:1] != ("params",), key)):
        name = ".".join(key)
        if key not in wanted:
            problems.append(f"{name}: only in the checkpoint")
        elif key not in saved:
            problems.append(f"{name}: missing from the checkpoint")
        else:
            old, new = saved[key], wanted[key]
            old_spec = (tuple(old.shape), str(old.dtype))
            new_spec = (tuple(new.shape), str(new.dtype))
            if old_spec != new_spec:
                problems.append(f"{name}: checkpoint={old_spec[1]}{list(old_spec[0])} "
                                f"current={new_spec[1]}{list(new_spec[0])}")
    if problems:
        listed = "; ".join(problems[:_MAX_LISTED])
        if len(problems) > _MAX_LISTED:
            listed += f"; and {len(problems) - _MAX_LISTED} more"
        raise ConfigError(f"cannot resume {run_dir}: checkpoint {step} does not match the current model and "
                          f"optimizer ({listed}). Use a new train.run_dir or the settings the run was started with")


def discard_interrupted(scan: CheckpointScan) -> None:
    """Delete the interrupted saves of a scan, logging each one (process 0 deletes, every process waits)."""
    if jax.process_index() == 0:
        for step, path in scan.interrupted:
            logger.warning("discarding the interrupted checkpoint save of step %d (%s): its save never finished",
                           step, path)
            shutil.rmtree(path)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("mor_jax:discard_interrupted_checkpoints")


def write_config(run_dir: str, config: Config) -> None:
    """Write config.yaml atomically (a temporary file renamed over the old one)."""
    path = os.path.join(run_dir, CONFIG_FILE)
    tmp = path + ".tmp"
    save_config(config, tmp)
    os.replace(tmp, path)
