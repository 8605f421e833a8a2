"""Config loading: presets, dotted overrides, type checks and validation errors."""

import pytest

from mor_jax.config import ConfigError, config_from_dict, config_to_dict, load_config, save_config


def test_presets_load():
    for path in ("configs/default.yaml", "configs/smoke.yaml", "configs/default_vanilla.yaml"):
        config = load_config(path)
        assert config.model.num_layers > 0


def test_vanilla_preset_matches_default_except_kind():
    default, vanilla = load_config("configs/default.yaml"), load_config("configs/default_vanilla.yaml")
    assert vanilla.model.kind == "vanilla"
    assert vanilla.model.num_layers == default.model.num_layers
    assert vanilla.data == default.data
    assert vanilla.train.steps == default.train.steps


def test_overrides_are_typed():
    config = load_config("configs/smoke.yaml", ["train.steps=7", "train.learning_rate=1e-3", "model.gating=false",
                                                "model.capacities=[1.0, 0.5, 0.25]"])
    assert config.train.steps == 7
    assert config.train.learning_rate == pytest.approx(1e-3)
    assert config.model.gating is False
    assert config.model.capacities == (1.0, 0.5, 0.25)


def test_round_trip_through_yaml(tmp_path):
    config = load_config("configs/smoke.yaml", ["model.capacities=[1.0, 0.5, 0.5]"])
    save_config(config, tmp_path / "config.yaml")
    assert load_config(str(tmp_path / "config.yaml")) == config
    assert config_from_dict(config_to_dict(config)) == config


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["model.nope=1"], "unknown config key model.nope"),
        (["modle.kind=mor"], "unknown config section 'modle'"),
        (["train.steps"], "expected section.field=value"),
        (["train.steps=ten"], "train.steps: expected an integer, got 'ten'"),
        (["model.gating=maybe"], "model.gating: expected true or false"),
        (["model.kind=moe"], "model.kind='moe' is not supported; allowed values: vanilla, recursive, mor"),
        (["model.num_layers=9"], "nearest valid num_layers: 8 or 11"),
        (["data.seq_len=0"], "data.seq_len=0 must be > 0"),
        (["data.seq_len=4096"], "exceeds model.max_seq_len=2048"),
        (["model.capacities=[1.0, 0.5]"], "give one capacity per recursion"),
        (["model.capacities=[1.0, 0.5, 0.75]"], "must be non-increasing"),
        (["model.capacities=[1.0, 0.5, 0.0]"], "must be in (0, 1]"),
        (["model.num_heads=3"], "must be a multiple of model.num_kv_heads"),
        (["data.source=files"], "needs data.train_paths"),
        (["mesh.data=-1", "mesh.fsdp=-1"], "at most one -1"),
    ],
)
def test_invalid_values_name_the_key(overrides, message):
    with pytest.raises(ConfigError) as error:
        load_config("configs/smoke.yaml", overrides)
    assert message in str(error.value)


def test_malformed_yaml_is_reported(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(str(path))


def test_yaml_cannot_build_python_objects(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("model: !!python/object/apply:os.system ['echo hacked']\n")
    with pytest.raises(ConfigError, match="malformed YAML"):
        load_config(str(path))


def test_missing_config_file():
    with pytest.raises(ConfigError, match="config file not found: nowhere.yaml"):
        load_config("nowhere.yaml")
