"""Two CPU processes on 127.0.0.1 train, checkpoint and resume like one process with two devices.

Each process runs train.py with JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID set, so
mor_jax.training.distributed starts jax.distributed, and XLA's CPU collectives (gloo in jax 0.10.2) join the two
processes into one 2-device mesh. The reference is one process with two simulated CPU devices, the same mesh.
"""

import json
import os
import shutil
import socket
import subprocess
import sys

import flax.linen as nn
import jax
import numpy as np
import pytest

from mor_jax.config import load_config
from mor_jax.model import build_model
from mor_jax.training import checkpoint as ckpt
from mor_jax.training.state import abstract_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = os.path.join(ROOT, "configs", "smoke.yaml")
RUN = ("train.steps=6", "train.checkpoint_every=3", "train.log_every=1", "train.final_eval_batches=1",
       "train.eval_every=0")
TIMEOUT = 600


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(devices: int) -> dict:
    env = {key: value for key, value in os.environ.items() if not key.startswith("JAX_")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return env


def command(run_dir: str) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "train.py"), "--config", SMOKE, f"train.run_dir={run_dir}", *RUN]


def run_two_processes(run_dir: str) -> list[dict]:
    port = free_port()
    processes = []
    for index in range(2):
        env = dict(base_env(1), JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
                   JAX_PROCESS_ID=str(index))
        processes.append(subprocess.Popen(command(run_dir), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
    results = []
    for index, process in enumerate(processes):
        stdout, stderr = process.communicate(timeout=TIMEOUT)
        assert process.returncode == 0, f"process {index} failed:\n{stderr[-4000:]}"
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    return results


def run_one_process(run_dir: str) -> dict:
    process = subprocess.run(command(run_dir), env=base_env(2), capture_output=True, text=True, timeout=TIMEOUT)
    assert process.returncode == 0, process.stderr[-4000:]
    return json.loads(process.stdout.strip().splitlines()[-1])


def logged_losses(run_dir: str) -> list[tuple[int, float]]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return [(row["step"], row["train/loss"]) for row in rows if "train/loss" in row]


def saved_state(run_dir: str, step: int) -> dict:
    """Every leaf of the train state saved at `step`, restored onto this process's first device."""
    config = load_config(SMOKE, [f"train.run_dir={run_dir}", *RUN])
    abstract = abstract_state(config, build_model(config.model), make_optimizer(config.train, config.model))
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = ckpt.abstract_target(abstract, jax.tree_util.tree_map(lambda _: device, nn.unbox(abstract)))
    manager = ckpt.make_manager(run_dir, read_only=True)
    try:
        state = ckpt.restore(manager, step, target)
    finally:
        manager.close()
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("multiprocess")
    reference_dir = str(base / "one_process")
    reference = run_one_process(reference_dir)

    run_dir = str(base / "two_processes")
    first = run_two_processes(run_dir)
    first_losses = logged_losses(run_dir)
    # Drop the last checkpoint, so the second launch resumes from step 3 and trains steps 4 to 6 again.
    shutil.rmtree(os.path.join(ckpt.checkpoint_dir(run_dir), "6"))
    resumed = run_two_processes(run_dir)
    return {"reference_dir": reference_dir, "reference": reference, "run_dir": run_dir, "first": first,
            "first_losses": first_losses, "resumed": resumed}


# gloo's cross-process all-reduce sums the two devices' gradients in another order than XLA's in-process
# all-reduce, so the runs agree to float32 rounding, not bitwise: losses differed by 1e-7 relative (2-core CPU).
LOSS_RTOL = 1e-5
# Adam turns the relative noise of small gradients into update noise of up to the learning rate (3e-3) per step.
# A wrong update would differ by about that much.
PARAM_ATOL = 5e-4


def test_two_processes_match_one_process(runs):
    reference = logged_losses(runs["reference_dir"])
    losses = runs["first_losses"]
    # Process 0 alone writes metrics.jsonl, so every step appears once.
    assert [step for step, _ in losses] == [step for step, _ in reference]
    np.testing.assert_allclose([loss for _, loss in losses], [loss for _, loss in reference], rtol=LOSS_RTOL)
    for result in runs["first"]:
        assert result["val_loss"] == pytest.approx(runs["reference"]["val_loss"], rel=LOSS_RTOL)


def test_two_processes_resume_exactly(runs):
    losses = logged_losses(runs["run_dir"])
    # The resumed launch appends steps 4 to 6 again after the first launch's six lines, with the same values.
    assert losses[6:] == runs["first_losses"][3:]
    for first, resumed in zip(runs["first"], runs["resumed"]):
        assert resumed["step"] == 6
        assert resumed["train_loss"] == first["train_loss"]
        assert resumed["val_loss"] == first["val_loss"]


def test_two_process_checkpoint_matches_one_process(runs):
    reference = saved_state(runs["reference_dir"], 6)
    resumed = saved_state(runs["run_dir"], 6)
    assert reference.keys() == resumed.keys()
    differences = {name: float(np.max(np.abs(reference[name] - resumed[name]), initial=0.0)) for name in reference}
    worst = max(differences, key=differences.get)
    assert differences[worst] <= PARAM_ATOL, f"{worst} differs by {differences[worst]:.3g}"
