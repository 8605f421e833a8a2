"""Paper presets in configs/paper/ and the parameter counter `mor_jax.tools.count_params`."""

import functools
import glob
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from mor_jax.config import load_config
from mor_jax.tools.count_params import count_parameters, parameter_shapes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAPER = os.path.join(ROOT, "configs", "paper")
PRESETS = sorted(glob.glob(os.path.join(PAPER, "*.yaml")))


def preset(name: str) -> str:
    return os.path.join(PAPER, name)


@functools.lru_cache(maxsize=None)
def counts(name: str) -> dict:
    return count_parameters(preset(name))


@functools.lru_cache(maxsize=None)
def shapes(name: str) -> dict:
    return parameter_shapes(load_config(preset(name)).model)


def load_make_presets():
    spec = importlib.util.spec_from_file_location("make_presets", os.path.join(PAPER, "make_presets.py"))
    module = importlib.util.module_from_spec(spec)
    # Dataclasses look their module up in sys.modules while the module executes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_presets_match_generator():
    make_presets = load_make_presets()
    expected = {}
    for base in make_presets.BASES:
        for variant in make_presets.variants():
            expected[make_presets.file_name(base, variant)] = make_presets.render(base, variant)
    assert len(expected) == 52
    assert sorted(os.path.basename(p) for p in PRESETS) == sorted(expected)
    for name, text in expected.items():
        with open(preset(name), encoding="utf-8") as handle:
            assert handle.read() == text, f"{name} is stale; rerun configs/paper/make_presets.py"


@pytest.mark.parametrize("path", PRESETS, ids=os.path.basename)
def test_preset_loads(path):
    config = load_config(path)
    assert config.model.vocab_size == 49152
    assert config.model.head_dim == 64
    assert config.data.seq_len == 2048
    assert config.data.batch_size == 1024


@pytest.mark.parametrize(
    "name,layers",
    [
        ("360m_mor_ec_nr4.yaml", 34),
        ("135m_mor_ec_nr3.yaml", 32),
        ("360m_mor_ec_nr3.yaml", 32),
        ("1p7b_recursive_nr4.yaml", 26),
    ],
)
def test_preset_layer_counts(name, layers):
    model = load_config(preset(name)).model
    assert model.num_layers == layers
    assert (model.num_layers - 2) % model.num_recursions == 0


# Targets: the non-embedding counts Bae et al. (arXiv 2507.10524) give for these models, rounded to 1M.
@pytest.mark.parametrize("num_recursions,expected", [(2, 167e6), (3, 118e6), (4, 98e6)])
def test_360m_expert_choice_counts(num_recursions, expected):
    result = counts(f"360m_mor_ec_nr{num_recursions}.yaml")
    assert abs(result["non_embedding_params"] - expected) / expected < 0.01, result


def test_360m_vanilla_count():
    result = counts("360m_vanilla.yaml")
    assert abs(result["non_embedding_params"] - 315e6) / 315e6 < 0.01, result
    assert result["embedding_params"] == 49152 * 960
    assert result["total_params"] == result["non_embedding_params"] + result["embedding_params"]
    assert result["router_params"] == 0


@pytest.mark.parametrize("variant", ["mor_ec", "mor_tc"])
def test_mor_adds_only_routers(variant):
    recursive = shapes("360m_recursive_nr3.yaml")
    mor = shapes(f"360m_{variant}_nr3.yaml")
    routers = {path: shape for path, shape in mor.items() if any("router" in part for part in path)}
    assert routers, f"no router parameters in {variant}: {sorted(mor)}"
    without_routers = {path: shape for path, shape in mor.items() if path not in routers}
    assert without_routers == recursive
    # Both routings have N_r x d_model router weights: one d_model -> 1 router per recursion (expert-choice) or
    # one d_model -> N_r router (token-choice).
    assert counts(f"360m_{variant}_nr3.yaml")["router_params"] == 3 * 960
    assert counts(f"360m_{variant}_nr3.yaml")["non_embedding_params"] == (
        counts("360m_recursive_nr3.yaml")["non_embedding_params"] + 3 * 960
    )


def run_cli(*args):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, "-m", "mor_jax.tools.count_params", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_json_lines():
    names = ["configs/paper/135m_vanilla.yaml", "configs/paper/135m_mor_ec_nr3.yaml"]
    result = run_cli(*names, "--json")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2
    for name, line in zip(names, lines):
        row = json.loads(line)
        assert row["config"] == name
        assert row == count_parameters(os.path.join(ROOT, name)) | {"config": name}
        assert row["embedding_params"] == 49152 * 576


def test_cli_table():
    result = run_cli("configs/paper/135m_mor_ec_nr3.yaml")
    assert result.returncode == 0, result.stderr
    header, row = result.stdout.strip().splitlines()
    assert header.split()[:3] == ["config", "kind", "routing"]
    assert row.split()[:5] == ["configs/paper/135m_mor_ec_nr3.yaml", "mor", "expert_choice", "32", "3"]


def test_cli_rejects_missing_config(tmp_path):
    missing = str(tmp_path / "missing.yaml")
    result = run_cli(missing)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: config file not found: {missing}"]


def test_cli_rejects_invalid_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  kind: recursive\n  num_layers: 7\n  num_recursions: 3\n")
    result = run_cli(str(bad))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "model.num_layers=7" in errors[0]
