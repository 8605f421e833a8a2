"""Reliability of training: kills, preemption, interrupted saves, mismatched resumes, non-finite steps, bad input.

The kill tests run train.py in subprocesses, watch metrics.jsonl and the checkpoint directory, and send real SIGKILL
and SIGTERM signals. Every test that expects exact results compares against one uninterrupted reference run of the
same command, bitwise: losses as logged in metrics.jsonl and every leaf of the final saved state.
"""

import hashlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mor_jax.config import load_config
from mor_jax.training import checkpoint as ckpt
from mor_jax.training import loop, train
from mor_jax.training.steps import skip_nonfinite_updates

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
# The command every kill test runs and restarts. Steps take tens of milliseconds on a CPU, so 100 steps leave a
# window of seconds after the first checkpoint in which to kill the process.
KILL_RUN = ("train.steps=100", "train.checkpoint_every=10", "train.log_every=1", "train.final_eval_batches=1")
STEPS = 100
# Seconds to wait for a subprocess to reach a state; generous because the CPUs may be shared.
DEADLINE = 240
# Seed of the random kill steps, printed in failure messages so that a failure can be replayed.
SEED = int(os.environ.get("MOR_JAX_KILL_SEED", random.randrange(2**31)))


def train_command(run_dir, *overrides):
    return [sys.executable, "train.py", "--config", SMOKE, f"train.run_dir={run_dir}", *overrides]


def child_env(**extra):
    return dict(os.environ, PYTHONPATH=ROOT, **extra)


@pytest.fixture(scope="module")
def cached_env(tmp_path_factory):
    """Environment of the kill tests' subprocesses: one JAX compilation cache, so restarts skip compiling."""
    cache = tmp_path_factory.mktemp("jax_cache")
    return child_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")


def run_train(run_dir, *overrides, env=None):
    return subprocess.run(train_command(run_dir, *overrides), cwd=ROOT, env=env or child_env(), capture_output=True,
                          text=True, timeout=600)


class Trainer:
    """train.py running in the background, with its output in files so that no pipe fills up."""

    def __init__(self, tmp_path, env, run_dir, *overrides):
        self.run_dir = str(run_dir)
        self.stdout_path, self.stderr_path = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
        with open(self.stdout_path, "w") as stdout, open(self.stderr_path, "w") as stderr:
            self.process = subprocess.Popen(train_command(run_dir, *overrides), cwd=ROOT, env=env,
                                            stdout=stdout, stderr=stderr)

    def wait_for(self, condition, description):
        deadline = time.monotonic() + DEADLINE
        while not condition():
            if self.process.poll() is not None:
                pytest.fail(f"train.py exited with {self.process.returncode} before {description} (seed {SEED}):\n"
                            f"{self.stderr_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"timed out waiting for {description} (seed {SEED})")
            time.sleep(0.002)

    def finish(self):
        returncode = self.process.wait(timeout=DEADLINE)
        return returncode, self.stdout_path.read_text(), self.stderr_path.read_text()

    def stop(self):
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def trainer(tmp_path, cached_env):
    started = []

    def start(run_dir, *overrides):
        started.append(Trainer(tmp_path, cached_env, run_dir, *overrides))
        return started[-1]

    yield start
    for process in started:
        process.stop()


def read_losses(run_dir):
    """Map step -> train/loss, keeping the last record of each step (a resumed run logs its steps again)."""
    losses = {}
    try:
        with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
            lines = handle.read().splitlines()
    except FileNotFoundError:
        return losses
    for line in lines:
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue  # the line being written, or the one a killed process left unfinished
        if "train/loss" in row:
            losses[row["step"]] = row["train/loss"]
    return losses


def last_logged_step(run_dir):
    return max(read_losses(run_dir), default=0)


def committed_steps(run_dir):
    """Steps with Orbax's commit file, read while a trainer may be renaming directories."""
    directory = ckpt.checkpoint_dir(run_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(name) for name in names
                  if name.isdigit() and os.path.exists(os.path.join(directory, name, ckpt.COMMIT_FILE)))


def temporary_steps(run_dir):
    directory = ckpt.checkpoint_dir(run_dir)
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return []
    return sorted(int(name.split(".")[0]) for name in names if ckpt.TMP_SUFFIX in name)


def saved_leaves(run_dir, step):
    """Every leaf of the saved TrainState of `step` as raw bytes, keyed by path."""
    path = os.path.join(ckpt.checkpoint_dir(run_dir), str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path)
    return {jax.tree_util.keystr(key): np.asarray(leaf).tobytes()
            for key, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def assert_same_as_reference(reference, run_dir, first_step=1):
    losses = read_losses(run_dir)
    for step in range(first_step, STEPS + 1):
        assert losses.get(step) == reference["losses"][step], f"loss of step {step} (seed {SEED})"
    leaves = saved_leaves(run_dir, STEPS)
    assert leaves.keys() == reference["leaves"].keys()
    for key, value in leaves.items():
        assert value == reference["leaves"][key], f"final state leaf {key} differs (seed {SEED})"


def tree_digest(path):
    """Names, sizes, modification times and contents of everything under `path`."""
    digest = []
    for directory, subdirectories, files in os.walk(path):
        subdirectories.sort()
        for name in sorted(files) + subdirectories:
            full = os.path.join(directory, name)
            stat = os.lstat(full)
            content = b""
            if os.path.isfile(full):
                with open(full, "rb") as handle:
                    content = hashlib.sha256(handle.read()).digest()
            digest.append((os.path.relpath(full, path), stat.st_size, stat.st_mtime_ns, content))
    return digest


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for fragment in fragments:
        assert fragment in errors[0]


@pytest.fixture(scope="module")
def reference(tmp_path_factory, cached_env):
    """The uninterrupted run of KILL_RUN: its logged losses and final saved state."""
    run_dir = str(tmp_path_factory.mktemp("reference") / "run")
    result = run_train(run_dir, *KILL_RUN, env=cached_env)
    assert result.returncode == 0, result.stderr
    return {"losses": read_losses(run_dir), "leaves": saved_leaves(run_dir, STEPS)}


# Killing and preemption.


@pytest.mark.slow
def test_sigkill_then_restart_is_exact(reference, trainer, cached_env, tmp_path):
    run_dir = str(tmp_path / "run")
    kill_after = random.Random(SEED).randint(11, STEPS - 20)
    process = trainer(run_dir, *KILL_RUN)
    process.wait_for(lambda: committed_steps(run_dir) and last_logged_step(run_dir) >= kill_after,
                     f"a checkpoint and step {kill_after}")
    process.process.send_signal(signal.SIGKILL)
    assert process.process.wait() == -signal.SIGKILL
    restart_point = max(committed_steps(run_dir))
    assert restart_point >= 10

    rerun = run_train(run_dir, *KILL_RUN, env=cached_env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed {run_dir} from step {restart_point}," in rerun.stderr
    assert_same_as_reference(reference, run_dir)


@pytest.mark.slow
def test_sigterm_saves_and_exits_zero(reference, trainer, cached_env, tmp_path):
    run_dir = str(tmp_path / "run")
    signal_after = random.Random(SEED + 1).randint(5, STEPS - 20)
    process = trainer(run_dir, *KILL_RUN)
    process.wait_for(lambda: last_logged_step(run_dir) >= signal_after, f"step {signal_after}")
    process.process.send_signal(signal.SIGTERM)
    returncode, stdout, stderr = process.finish()
    assert returncode == 0, stderr

    result = json.loads(stdout.strip().splitlines()[-1])
    stopped_at = result["step"]
    assert result["preempted"] is True
    assert signal_after <= stopped_at < STEPS
    assert f"SIGTERM received at step {stopped_at}; checkpoint {stopped_at} is complete" in stderr
    scan = ckpt.scan_checkpoints(run_dir)
    assert scan.latest == stopped_at
    assert scan.interrupted == []

    rerun = run_train(run_dir, *KILL_RUN, env=cached_env)
    assert rerun.returncode == 0, rerun.stderr
    assert f"resumed {run_dir} from step {stopped_at}," in rerun.stderr
    assert_same_as_reference(reference, run_dir)


@pytest.mark.slow
def test_sigkill_during_save_resumes_from_previous(reference, trainer, cached_env, tmp_path):
    run_dir = str(tmp_path / "run")
    # A save takes a fraction of a second, so the kill usually lands inside one. If Orbax renamed the temporary
    # directory between the poll and the signal, the test restarts the run and aims at the next save.
    for _ in range(3):
        process = trainer(run_dir, *KILL_RUN)
        process.wait_for(lambda: any(step > 10 for step in temporary_steps(run_dir)), "a save after step 10")
        process.process.send_signal(signal.SIGKILL)
        process.process.wait()
        if temporary_steps(run_dir):
            break
    else:
        pytest.fail("three kills in a row missed the save they aimed at")

    scan = ckpt.scan_checkpoints(run_dir)
    interrupted = [step for step, _ in scan.interrupted]
    assert interrupted and scan.latest is not None
    assert scan.latest < max(interrupted)

    rerun = run_train(run_dir, *KILL_RUN, env=cached_env)
    assert rerun.returncode == 0, rerun.stderr
    for step in interrupted:
        assert f"discarding the interrupted checkpoint save of step {step}" in rerun.stderr
    assert f"resumed {run_dir} from step {scan.latest}," in rerun.stderr
    assert_same_as_reference(reference, run_dir)


def smoke(run_dir, *overrides):
    return load_config(SMOKE, [f"train.run_dir={run_dir}", "train.final_eval_batches=1", *overrides])


# A two-layer vanilla model compiles in about half the time of the smoke MoR model; the non-finite tests do not
# depend on the architecture.
SMALL_MODEL = ("model.kind=vanilla", "model.num_layers=2")
FINISHED_RUN = (*SMALL_MODEL, "train.steps=4", "train.checkpoint_every=2", "train.log_every=1")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished run of the small model with checkpoints at steps 2 and 4, for tests that damage a copy of it."""
    run_dir = str(tmp_path_factory.mktemp("finished") / "run")
    train(smoke(run_dir, *FINISHED_RUN))
    return run_dir


def copy_run(finished_run, tmp_path):
    run_dir = str(tmp_path / "run")
    shutil.copytree(finished_run, run_dir)
    return run_dir


def test_half_written_checkpoints_are_discarded(finished_run, tmp_path, caplog):
    run_dir = copy_run(finished_run, tmp_path)
    directory = ckpt.checkpoint_dir(run_dir)
    # Step 4 loses its commit file, as on a file system whose rename is not atomic. A temporary directory of step 6
    # contains a partial copy, as a save killed half-way leaves it.
    os.remove(os.path.join(directory, "4", ckpt.COMMIT_FILE))
    shutil.copytree(os.path.join(directory, "2", "state"), os.path.join(directory, "6" + ckpt.TMP_SUFFIX, "state"))
    assert ckpt.scan_checkpoints(run_dir).complete == [2]

    with caplog.at_level(logging.INFO, logger="mor_jax"):
        result = train(smoke(run_dir, *FINISHED_RUN))
    assert "discarding the interrupted checkpoint save of step 4" in caplog.text
    assert "discarding the interrupted checkpoint save of step 6" in caplog.text
    assert f"resumed {run_dir} from step 2," in caplog.text
    assert result["step"] == 4
    first_pass, second_pass = read_losses(finished_run), read_losses(run_dir)
    for step in (3, 4):
        assert second_pass[step] == first_pass[step], f"step {step}"
    assert sorted(os.listdir(directory)) == ["2", "4"]


def test_scan_sorts_checkpoint_entries(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    directory = ckpt.checkpoint_dir(run_dir)
    shutil.copytree(os.path.join(directory, "4"), os.path.join(directory, "6"))
    shutil.rmtree(os.path.join(directory, "6", "data"))  # as a kill while Orbax deletes an old step leaves it
    os.makedirs(os.path.join(directory, "8" + ckpt.TMP_SUFFIX))
    scan = ckpt.scan_checkpoints(run_dir)
    assert scan.complete == [2, 4]
    assert [step for step, _ in scan.interrupted] == [6, 8]


def test_killed_writer_partial_metrics_line_is_ended(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "train/loss": 5.0}\n{"step": 2, "train/lo')
    logger = loop.MetricsLogger(str(tmp_path), enabled=True)
    logger.log(3, "train", {"loss": np.float32(4.0)})
    logger.close()
    lines = path.read_text().splitlines()
    assert lines[1] == '{"step": 2, "train/lo'
    assert json.loads(lines[2]) == {"step": 3, "train/loss": 4.0}


# Resuming with another config, or a run directory that is not mor_jax's.


def test_resume_with_other_model_lists_each_field(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    before = tree_digest(run_dir)
    result = run_train(run_dir, *SMALL_MODEL, "train.steps=8", "model.d_model=48", "model.d_ff=96")
    assert_one_line_error(result, f"cannot resume {run_dir}", "model.d_model: checkpoint=64 current=48",
                          "model.d_ff: checkpoint=128 current=96")
    assert tree_digest(run_dir) == before


def test_resume_with_other_settings_warns(finished_run, tmp_path, caplog):
    run_dir = copy_run(finished_run, tmp_path)
    same = smoke(run_dir, *FINISHED_RUN)
    changed = smoke(run_dir, *FINISHED_RUN, "train.steps=8", "data.seed=1")
    with caplog.at_level(logging.WARNING, logger="mor_jax"):
        assert ckpt.check_resumable(run_dir, same).latest == 4
        assert "settings that differ" not in caplog.text
        assert ckpt.check_resumable(run_dir, changed).latest == 4
    assert "data.seed: 0 -> 1; train.steps: 4 -> 8" in caplog.text


def test_resume_without_config_yaml_is_rejected(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    os.remove(os.path.join(run_dir, "config.yaml"))
    before = tree_digest(run_dir)
    result = run_train(run_dir, *SMALL_MODEL, "train.steps=8")
    assert_one_line_error(result, "has checkpoints but no config.yaml")
    assert tree_digest(run_dir) == before


def test_resume_with_corrupt_config_yaml_is_rejected(finished_run, tmp_path):
    run_dir = copy_run(finished_run, tmp_path)
    with open(os.path.join(run_dir, "config.yaml"), "w") as handle:
        handle.write("model: {d_model: [64\n")
    before = tree_digest(run_dir)
    result = run_train(run_dir, *SMALL_MODEL, "train.steps=8")
    assert_one_line_error(result, "config.yaml is invalid", "malformed YAML")
    assert tree_digest(run_dir) == before


def test_config_yaml_not_matching_checkpoint_is_rejected(finished_run, tmp_path):
    # config.yaml agrees with the new settings, but the checkpoint was written with d_ff=128: the shapes in Orbax's
    # metadata catch it.
    run_dir = copy_run(finished_run, tmp_path)
    config_path = os.path.join(run_dir, "config.yaml")
    with open(config_path) as handle:
        text = handle.read()
    assert "d_ff: 128" in text
    with open(config_path, "w") as handle:
        handle.write(text.replace("d_ff: 128", "d_ff: 96"))
    before = tree_digest(run_dir)
    result = run_train(run_dir, *SMALL_MODEL, "train.steps=8", "model.d_ff=96")
    assert_one_line_error(result, "checkpoint 4 does not match the current model",
                          "checkpoint=float32[64, 128] current=float32[64, 96]")
    assert tree_digest(run_dir) == before


def test_foreign_files_in_checkpoints_are_rejected(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / "checkpoints").mkdir(parents=True)
    (run_dir / "checkpoints" / "model.safetensors").write_bytes(b"\0" * 16)
    (run_dir / "checkpoints" / "notes").mkdir()
    before = tree_digest(run_dir)
    result = run_train(run_dir, "train.steps=4")
    assert_one_line_error(result, "contains entries that mor_jax does not write", "model.safetensors", "notes")
    assert tree_digest(run_dir) == before


def test_orbax_checkpoint_with_other_items_is_rejected(tmp_path):
    run_dir = tmp_path / "run"
    manager = ocp.CheckpointManager(run_dir / "checkpoints", item_names=("params",))
    manager.save(3, args=ocp.args.Composite(params=ocp.args.StandardSave({"w": np.ones(3, np.float32)})))
    manager.wait_until_finished()
    manager.close()
    before = tree_digest(run_dir)
    result = run_train(run_dir, "train.steps=4")
    assert_one_line_error(result, "3 (items params; mor_jax writes state, data)")
    assert tree_digest(run_dir) == before


# Non-finite steps. The guard is tested on the real jitted step. In the loop tests, a test double of
# make_train_step returns a NaN loss and NaN parameters at chosen steps, as a step with an overflow or a bad batch
# would.


def poison_steps(monkeypatch, bad_steps):
    real_make_train_step = loop.make_train_step

    def make_poisoned_train_step(*args, **kwargs):
        real_step = real_make_train_step(*args, **kwargs)
        bad = jnp.asarray(sorted(bad_steps), jnp.int32)

        def poisoned_step(state, batch):
            new_state, metrics = real_step(state, batch)
            # new_state.step is the number of the step just taken, the one the loop logs.
            factor = jnp.where(jnp.isin(new_state.step, bad), jnp.nan, 1.0)
            params = jax.tree_util.tree_map(lambda leaf: leaf * factor, new_state.params)
            return new_state.replace(params=params), dict(metrics, loss=metrics["loss"] * factor)

        return poisoned_step

    monkeypatch.setattr(loop, "make_train_step", make_poisoned_train_step)


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def all_params_finite(run_dir, step):
    path = os.path.join(ckpt.checkpoint_dir(run_dir), str(step), "state")
    with ocp.StandardCheckpointer() as checkpointer:
        tree = checkpointer.restore(path)
    return all(np.isfinite(np.asarray(leaf)).all() for leaf in jax.tree_util.tree_leaves(tree)
               if np.issubdtype(np.asarray(leaf).dtype, np.floating))


def test_guard_keeps_state_on_nonfinite_step(tmp_path):
    from mor_jax.data import make_tokenizer
    from mor_jax.model import build_model
    from mor_jax.training.mesh import logical_rules, make_mesh
    from mor_jax.training.state import create_train_state, learning_rate_schedule, make_optimizer
    from mor_jax.training.steps import make_train_step

    config = smoke(str(tmp_path / "unused"), *SMALL_MODEL)
    model, optimizer = build_model(config.model), make_optimizer(config.train, config.model)
    mesh = make_mesh(config.mesh)
    state = create_train_state(config, model, optimizer, mesh, logical_rules(config.mesh))
    real_step = make_train_step(model, optimizer, learning_rate_schedule(config.train),
                                make_tokenizer(config.data).pad_id)
    batch = jnp.asarray(np.random.default_rng(0).integers(0, 256, (8, 33)), jnp.int32)

    def nan_update_step(state, batch):
        new_state, metrics = real_step(state, batch)
        return new_state.replace(params=jax.tree_util.tree_map(lambda p: p * jnp.nan, new_state.params)), metrics

    with jax.set_mesh(mesh):
        plain_state, _ = jax.jit(real_step)(state, batch)
        guarded_state, metrics = jax.jit(skip_nonfinite_updates(real_step))(state, batch)
        skipped_state, skipped_metrics = jax.jit(skip_nonfinite_updates(nan_update_step))(state, batch)

    assert int(metrics["nonfinite"]) == 0
    for plain, guarded in zip(jax.tree_util.tree_leaves(plain_state), jax.tree_util.tree_leaves(guarded_state)):
        assert np.asarray(plain).tobytes() == np.asarray(guarded).tobytes()
    assert int(skipped_metrics["nonfinite"]) == 1
    assert int(skipped_state.step) == int(state.step) + 1
    for name in ("params", "opt_state", "model_state"):
        for before, after in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                                 jax.tree_util.tree_leaves(getattr(skipped_state, name))):
            assert np.asarray(before).tobytes() == np.asarray(after).tobytes(), name


def test_nonfinite_steps_are_skipped_and_counted(tmp_path, monkeypatch, caplog):
    poison_steps(monkeypatch, {6, 10})
    run_dir = str(tmp_path / "run")
    with caplog.at_level(logging.WARNING, logger="mor_jax"):
        result = train(smoke(run_dir, *SMALL_MODEL, "train.steps=12", "train.checkpoint_every=4",
                             "train.log_every=4"))
    assert result["step"] == 12
    assert np.isfinite(result["val_loss"])
    flagged = {row["step"] for row in read_rows(run_dir) if row.get("train/nonfinite") == 1}
    assert flagged == {6, 10}
    assert "step 6: non-finite loss" in caplog.text
    assert "(2 of train.max_nonfinite_steps=10)" in caplog.text
    for step in (4, 8, 12):
        assert all_params_finite(run_dir, step)


def test_nonfinite_stop_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    # Step 8 is a checkpoint step: the run must stop before saving it.
    poison_steps(monkeypatch, {8})
    run_dir = str(tmp_path / "run")
    with pytest.raises(loop.TrainingStopped) as error:
        train(smoke(run_dir, *SMALL_MODEL, "train.steps=12", "train.checkpoint_every=4",
                    "train.nonfinite=stop"))
    assert "step 8 has a non-finite loss" in str(error.value)
    assert "the latest checkpoint is step 4" in str(error.value)
    assert ckpt.scan_checkpoints(run_dir).complete == [4]
    assert all_params_finite(run_dir, 4)


def test_nonfinite_limit_stops_the_run(tmp_path, monkeypatch):
    poison_steps(monkeypatch, {3, 6, 7})
    run_dir = str(tmp_path / "run")
    with pytest.raises(loop.TrainingStopped) as error:
        train(smoke(run_dir, *SMALL_MODEL, "train.steps=12", "train.checkpoint_every=4",
                    "train.max_nonfinite_steps=2"))
    assert "2 steps had a non-finite loss, gradient or update, the last at step 6" in str(error.value)
    assert "train.max_nonfinite_steps=2" in str(error.value)
    assert ckpt.scan_checkpoints(run_dir).complete == [4]
    assert all_params_finite(run_dir, 4)


# Bad input: one `error:` line naming the value, a non-zero exit and no run directory.


def small_corpus(tmp_path, train_bytes, name="train.txt", content=None):
    path = tmp_path / name
    path.write_bytes(content if content is not None else b"To be, or not to be. " * (train_bytes // 21 + 1))
    val = tmp_path / "val.txt"
    val.write_bytes(b"That is the question. " * 20)
    return ["data.source=files", f"data.train_paths=[{path}]", f"data.val_paths=[{val}]"]


BAD_INPUT = {
    "unreadable corpus": (lambda tmp: ["data.source=files", "data.train_paths=[/proc/self/mem]"],
                          ["cannot read /proc/self/mem", "Input/output error"]),
    "binary corpus": (lambda tmp: small_corpus(tmp, 0, "weights.bin", b"\x00\x01\x02" * 500),
                      ["weights.bin contains NUL bytes"]),
    "corpus smaller than one batch": (lambda tmp: small_corpus(tmp, 100),
                                      ["fewer than one batch of data.batch_size=8"]),
    "seq_len above model maximum": (lambda tmp: ["data.seq_len=64", "model.max_seq_len=32"],
                                    ["data.seq_len=64 exceeds model.max_seq_len=32"]),
    "wrong type in override": (lambda tmp: ["train.steps=many"], ["train.steps: expected an integer, got 'many'"]),
    "unknown key in override": (lambda tmp: ["train.stepz=5"], ["unknown config key train.stepz"]),
    "infinite learning rate": (lambda tmp: ["train.learning_rate=inf"],
                               ["train.learning_rate=inf must be a finite number"]),
    "unknown nonfinite policy": (lambda tmp: ["train.nonfinite=ignore"],
                                 ["train.nonfinite='ignore' is not supported", "skip, stop"]),
    "run_dir under a regular file": (lambda tmp: [f"train.run_dir={tmp / 'file.txt' / 'run'}"],
                                     ["cannot create train.run_dir=", "Not a directory"]),
    "run_dir in /proc": (lambda tmp: ["train.run_dir=/proc/mor_jax_run"], ["cannot create train.run_dir=/proc"]),
    "run_dir is a file": (lambda tmp: [f"train.run_dir={tmp / 'file.txt'}"],
                          ["file.txt exists and is not a directory"]),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUT))
def test_train_rejects_bad_input(tmp_path, case):
    make_overrides, fragments = BAD_INPUT[case]
    (tmp_path / "file.txt").write_text("a regular file\n")
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "train.steps=2", *make_overrides(tmp_path))
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


def test_train_rejects_existing_unwritable_run_dir():
    # Root may write anywhere that permission bits guard, so this uses sysfs, where no process can create a file.
    if not os.path.isdir("/sys/kernel") or os.path.exists("/sys/kernel/checkpoints"):
        pytest.skip("needs a Linux sysfs at /sys")
    result = run_train("/sys/kernel", "train.steps=2")
    assert_one_line_error(result, "train.run_dir=/sys/kernel is not writable")


def test_train_rejects_batch_not_divisible_by_devices(tmp_path):
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=2")
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "train.steps=2", "data.batch_size=7", env=env)
    assert_one_line_error(result, "data.batch_size=7 is not divisible by the data-parallel size 2")
    assert not run_dir.exists()


@pytest.mark.parametrize("text,fragment", [
    ("model: [unclosed\n", "malformed YAML"),
    ("model: !!python/object/apply:os.system ['touch {marker}']\n", "malformed YAML"),
])
def test_train_rejects_bad_yaml_file(tmp_path, text, fragment):
    marker = tmp_path / "code_ran"
    config = tmp_path / "bad.yaml"
    config.write_text(text.format(marker=marker))
    result = subprocess.run([sys.executable, "train.py", "--config", str(config)], cwd=ROOT, env=child_env(),
                            capture_output=True, text=True, timeout=600)
    assert_one_line_error(result, fragment, str(config))
    assert not marker.exists()


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    text = b"To be, or not to be, that is the question. \xff\xfe " * 12
    run_dir = tmp_path / "run"
    result = run_train(run_dir, "train.steps=1", "train.final_eval_batches=1", *SMALL_MODEL,
                       *small_corpus(tmp_path, 0, "latin1.txt", text))
    assert result.returncode == 0, result.stderr
    assert "latin1.txt: replaced 24 invalid UTF-8 byte sequences with U+FFFD" in result.stderr
