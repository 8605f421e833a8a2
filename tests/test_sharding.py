"""Sharded training on 8 simulated CPU devices matches one device; parameters are sharded as mesh.rules map them.

One subprocess (tests/sharding_worker.py) runs every mesh, because XLA fixes the CPU device count when JAX starts.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from jax.sharding import AbstractMesh

from mor_jax.config import ConfigError, MeshConfig, load_config
from mor_jax.model import build_model
from mor_jax.training.mesh import MESH_AXES, check_divisible, logical_rules
from mor_jax.training.state import abstract_state, make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "sharding_worker.py")
MESHES = ("8x1x1", "2x4x1", "2x2x2", "1x8x1")
# Sharded reductions sum in another order than one device, so float32 losses and gradients differ by about 1e-7
# relative (measured up to 2.5e-7 on the losses).
LOSS_RTOL = 1e-5
# Adam divides each gradient by its root mean square, which turns the relative noise of small gradients into
# update noise of up to the learning rate (3e-3) per step. After 3 steps the measured maximum is 9.1e-5 (2x2x2 mesh,
# 2-core CPU); 5e-4 leaves room for other CPUs while still catching a wrong update, which is ~3e-3 per step.
PARAM_ATOL = 5e-4


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("sharding"))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    process = subprocess.run([sys.executable, WORKER, out_dir], env=env, capture_output=True, text=True, timeout=900)
    assert process.returncode == 0, f"sharding worker failed:\n{process.stderr[-6000:]}"
    with open(os.path.join(out_dir, "results.json"), encoding="utf-8") as handle:
        return json.load(handle)


def format_dump(dump: dict) -> str:
    return "\n".join(f"  {name}: logical {entry['logical']} spec {entry['spec']} shape {entry['shape']} "
                     f"shard {entry['shard_shape']}" for name, entry in sorted(dump.items()))


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_losses_match_one_device(results, mesh):
    reference = results["1x1x1"]["losses"]
    np.testing.assert_allclose(results[mesh]["losses"], reference, rtol=LOSS_RTOL)


@pytest.mark.parametrize("mesh", MESHES)
def test_mesh_parameters_match_one_device(results, mesh):
    differences = results[mesh]["param_max_abs_diff"]
    worst = max(differences, key=differences.get)
    assert differences[worst] <= PARAM_ATOL, f"{worst} differs by {differences[worst]:.3g} on {mesh}"


@pytest.mark.parametrize("mesh", MESHES)
def test_parameters_sharded_by_rules(results, mesh):
    sizes = dict(zip(MESH_AXES, map(int, mesh.split("x"))))
    rules = dict(logical_rules(MeshConfig()))
    dump = results[mesh]["sharding"]
    wrong = []
    for name, entry in dump.items():
        expected = []
        for size, axis in zip(entry["shape"], entry["logical"]):
            target = rules.get(axis)
            targets = target if isinstance(target, tuple) else (target,)
            expected.append(size // int(np.prod([sizes[t] for t in targets if t is not None])))
        if expected != entry["shard_shape"] or entry["devices"] != 8:
            wrong.append(f"{name}: expected shard {expected}")
    assert not wrong, f"on {mesh}: " + "; ".join(wrong) + "\nsharding dump:\n" + format_dump(dump)


def test_rules_shard_embed_mlp_and_heads(results):
    # The 2x2x2 mesh splits every rule's mesh axis in two.
    dump = results["2x2x2"]["sharding"]
    cases = {
        "embed/embedding": [192, 32],  # vocab over tensor, embed over fsdp
        "prelude/attention/query/kernel": [32, 2, 16],  # embed over fsdp, heads over tensor
        "prelude/attention/key/kernel": [32, 1, 16],  # kv_heads over tensor
        "recursion/block/layer_0/mlp/gate/kernel": [32, 64],  # embed over fsdp, mlp over tensor
        "recursion/block/layer_0/mlp/down/kernel": [64, 32],
        "final_norm/scale": [64],  # replicated
    }
    for name, shard_shape in cases.items():
        assert dump[name]["shard_shape"] == shard_shape, f"{name}\nsharding dump:\n{format_dump(dump)}"


@pytest.mark.parametrize("target", ["4x2x1", "1x1x1"])
def test_checkpoint_restores_onto_another_mesh(results, target):
    report = results["restore"][target]
    assert report["leaves"] > 0
    assert report["mismatched_values"] == [], f"values differ after restoring onto {target}"
    assert report["mismatched_shardings"] == [], f"shardings differ after restoring onto {target}"


def test_indivisible_heads_raise_config_error():
    config = load_config(os.path.join(ROOT, "configs", "smoke.yaml"), ["model.num_heads=6", "model.num_kv_heads=3"])
    model = build_model(config.model)
    abstract = abstract_state(config, model, make_optimizer(config.train, config.model))
    rules = logical_rules(config.mesh)
    with pytest.raises(ConfigError, match=r"'kv_heads' \(model.num_kv_heads\) has size 3, not a multiple of mesh "
                                          r"tensor=2"):
        check_divisible(abstract, AbstractMesh((1, 1, 2), MESH_AXES), rules)
    # 6 heads, 3 kv heads, d_model 64 and d_ff 128 all divide by fsdp=2.
    check_divisible(abstract, AbstractMesh((1, 2, 1), MESH_AXES), rules)
