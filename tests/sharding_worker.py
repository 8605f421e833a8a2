"""Train a tiny MoR model on several meshes of 8 simulated CPU devices and write the results as JSON.

Run by tests/test_sharding.py in a subprocess, because the device count has to be fixed before JAX starts:

    XLA_FLAGS=--xla_force_host_platform_device_count=8 python tests/sharding_worker.py OUT_DIR

Writes OUT_DIR/results.json with, per mesh, the losses of every step, the largest absolute difference of every
parameter from the one-device run, and the logical axes, spec and shard shape of every parameter. Then it saves a
checkpoint on a 2x4x1 mesh, restores it onto 4x2x1 and one device, and records whether values and shardings match.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from mor_jax.config import MeshConfig, load_config
from mor_jax.model import build_model
from mor_jax.training import checkpoint as ckpt
from mor_jax.training.mesh import batch_sharding, logical_rules, make_mesh
from mor_jax.training.state import (
    abstract_state,
    create_train_state,
    learning_rate_schedule,
    make_optimizer,
    state_shardings,
)
from mor_jax.training.steps import jit_train_step, make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (data, fsdp, tensor) meshes compared with one device.
MESHES = ((8, 1, 1), (2, 4, 1), (2, 2, 2), (1, 8, 1))
STEPS = 3
PAD_ID = 257
# Every sharded dimension divides by 8: d_model 64 (fsdp), heads 4 and kv heads 2 (tensor <= 2), d_ff 128,
# vocab 384, batch 16 (data x fsdp = 8).
OVERRIDES = [
    "model.num_layers=5", "model.num_recursions=3", "model.d_model=64", "model.num_heads=4", "model.num_kv_heads=2",
    "model.head_dim=16", "model.d_ff=128", "model.vocab_size=384", "data.seq_len=32", "data.batch_size=16",
    "train.learning_rate=3e-3", "train.warmup_steps=0", "train.steps=10",
]


def mesh_config(shape) -> MeshConfig:
    return MeshConfig(data=shape[0], fsdp=shape[1], tensor=shape[2])


def path_name(path) -> str:
    return "/".join(str(getattr(entry, "key", getattr(entry, "name", entry))) for entry in path)


def make_batches(config) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    shape = (config.data.batch_size, config.data.seq_len + 1)
    return [rng.integers(0, 256, shape, dtype=np.int32) for _ in range(STEPS)]


class Trainer:
    """The sharded state and jitted train step of one mesh."""

    def __init__(self, config, shape, devices):
        self.config = dataclasses.replace(config, mesh=mesh_config(shape))
        self.mesh = make_mesh(self.config.mesh, devices)
        self.rules = logical_rules(self.config.mesh)
        self.model = build_model(self.config.model)
        self.optimizer = make_optimizer(self.config.train, self.config.model)
        self.abstract = abstract_state(self.config, self.model, self.optimizer)
        self.shardings = state_shardings(self.config, self.model, self.optimizer, self.mesh, self.rules)
        self.tokens_sharding = batch_sharding(self.mesh, self.rules)
        step = make_train_step(self.model, self.optimizer, learning_rate_schedule(self.config.train), PAD_ID)
        self.step = jit_train_step(step, self.shardings, self.tokens_sharding)

    def init(self):
        return create_train_state(self.config, self.model, self.optimizer, self.mesh, self.rules)

    def train(self, state, batches):
        losses = []
        with jax.set_mesh(self.mesh):
            for batch in batches:
                array = jax.make_array_from_process_local_data(self.tokens_sharding, batch)
                state, metrics = self.step(state, array)
                losses.append(float(metrics["loss"]))
        return state, losses

    def target(self):
        return ckpt.abstract_target(self.abstract, self.shardings)


def sharding_dump(trainer: Trainer, params) -> dict:
    """Logical axes, PartitionSpec, global shape and first shard's shape of every parameter."""
    logical = nn.get_partition_spec(trainer.abstract.params)
    logical_leaves = dict((path_name(p), spec) for p, spec in
                          jax.tree_util.tree_leaves_with_path(logical, is_leaf=lambda x: isinstance(x, jax.P)))
    dump = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(params):
        name = path_name(path)
        dump[name] = {
            "logical": [None if a is None else str(a) for a in logical_leaves[name]],
            "spec": str(leaf.sharding.spec),
            "shape": list(leaf.shape),
            "shard_shape": list(leaf.addressable_shards[0].data.shape),
            "devices": len(leaf.sharding.device_set),
        }
    return dump


def host_tree(tree) -> dict:
    return {path_name(p): np.asarray(jax.device_get(leaf)) for p, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def max_differences(reference: dict, other: dict) -> dict:
    return {name: float(np.max(np.abs(reference[name].astype(np.float64) - other[name]))) for name in reference}


def run_meshes(config, batches, devices) -> tuple[dict, dict]:
    """Train STEPS steps on one device and on every mesh of MESHES; return the results and the 2x4x1 run."""
    single = Trainer(config, (1, 1, 1), devices[:1])
    state, losses = single.train(single.init(), batches)
    reference = host_tree(state.params)
    results = {"1x1x1": {"losses": losses}}
    kept = {}
    for shape in MESHES:
        trainer = Trainer(config, shape, devices)
        state, losses = trainer.train(trainer.init(), batches)
        results["x".join(map(str, shape))] = {
            "losses": losses,
            "param_max_abs_diff": max_differences(reference, host_tree(state.params)),
            "sharding": sharding_dump(trainer, state.params),
        }
        if shape == (2, 4, 1):
            kept = {"trainer": trainer, "state": state}
    return results, kept


def restore_across_meshes(config, trained: dict, devices, out_dir) -> dict:
    """Save the state trained on 2x4x1, restore it onto 4x2x1, save that, restore it onto one device.

    Every leaf of every restored state is compared bitwise with the saved one, and its sharding with the target's.
    """
    state = trained["state"]
    saved = host_tree(state)

    manager = ckpt.make_manager(os.path.join(out_dir, "run_a"))
    ckpt.save(manager, STEPS, state)
    manager.wait_until_finished()
    second = Trainer(config, (4, 2, 1), devices)
    restored = ckpt.restore(manager, STEPS, second.target())
    manager.close()
    report = {"4x2x1": compare_restored(saved, restored, second.target())}

    manager = ckpt.make_manager(os.path.join(out_dir, "run_b"))
    ckpt.save(manager, STEPS, restored)
    manager.wait_until_finished()
    third = Trainer(config, (1, 1, 1), devices[:1])
    restored = ckpt.restore(manager, STEPS, third.target())
    manager.close()
    report["1x1x1"] = compare_restored(saved, restored, third.target())
    return report


def compare_restored(saved: dict, restored, target) -> dict:
    values = host_tree(restored)
    mismatched_values = [name for name in saved if not np.array_equal(saved[name], values[name])]
    target_shardings = {path_name(p): leaf.sharding for p, leaf in jax.tree_util.tree_leaves_with_path(target)}
    mismatched_shardings = [
        f"{path_name(p)}: restored {leaf.sharding} target {target_shardings[path_name(p)]}"
        for p, leaf in jax.tree_util.tree_leaves_with_path(restored)
        if not leaf.sharding.is_equivalent_to(target_shardings[path_name(p)], leaf.ndim)
    ]
    return {"leaves": len(saved), "mismatched_values": mismatched_values, "mismatched_shardings": mismatched_shardings}


def main(out_dir: str) -> None:
    devices = jax.devices()
    if len(devices) != 8:
        raise SystemExit(f"expected 8 CPU devices, got {len(devices)}; set "
                         f"XLA_FLAGS=--xla_force_host_platform_device_count=8 before starting Python")
    config = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), OVERRIDES)
    batches = make_batches(config)
    results, trained = run_meshes(config, batches, devices)
    results["restore"] = restore_across_meshes(config, trained, devices, out_dir)
    with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
