"""Typed run configuration: dataclasses, YAML presets and dotted command-line overrides.

A run is described by one `Config` (model, data, train, mesh). Presets live in `configs/*.yaml`; any field can be
overridden as `section.field=value`, e.g. `train.steps=500` or `model.capacities=[1.0,0.5]`. Unknown keys, wrong types
and invalid values raise `ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Optional

import yaml


class MorJaxError(Exception):
    """Base class for errors caused by user input; CLIs print the message on one line and exit non-zero."""


class ConfigError(MorJaxError, ValueError):
    """Invalid configuration file, key or value."""


KINDS = ("vanilla", "recursive", "mor")
ROUTINGS = ("expert_choice",)
SHARINGS = ("middle_cycle",)
DTYPES = ("float32", "bfloat16")
DATA_SOURCES = ("shakespeare", "files")
TOKENIZERS = ("byte",)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the language model."""

    # "vanilla": num_layers distinct layers. "recursive": middle-cycle sharing, every token through every recursion.
    # "mor": middle-cycle sharing with a router choosing which tokens each recursion processes.
    kind: str = "mor"
    # Routing scheme for kind="mor". "expert_choice": each recursion keeps the top-k tokens of every sequence.
    routing: str = "expert_choice"
    # Parameter-sharing strategy of the recursive models. "middle_cycle": one unique prelude layer, a block of
    # (num_layers - 2) / num_recursions distinct layers applied num_recursions times, one unique coda layer.
    sharing: str = "middle_cycle"
    # Number of unrolled decoder layers L (prelude + recursions x block + coda for the recursive models).
    num_layers: int = 8
    # Number of recursions N_r of the shared block. Ignored by kind="vanilla".
    num_recursions: int = 3
    # Vocabulary size of the embedding table; at least the tokenizer's vocabulary (padded to a multiple of 128).
    vocab_size: int = 384
    # Width of the residual stream.
    d_model: int = 256
    # Number of query heads.
    num_heads: int = 4
    # Number of key/value heads (grouped-query attention); must divide num_heads.
    num_kv_heads: int = 2
    # Width of one attention head.
    head_dim: int = 64
    # Hidden width of the SwiGLU MLP.
    d_ff: int = 768
    # Maximum sequence length the model accepts, in tokens.
    max_seq_len: int = 2048
    # RoPE base frequency.
    rope_theta: float = 10000.0
    # RMSNorm epsilon (norms are computed in float32).
    norm_eps: float = 1e-5
    # Standard deviation of the normal initialiser of every weight matrix and of the embedding table.
    init_std: float = 0.02
    # Activation dtype inside the layers ("float32" or "bfloat16"); parameters are always float32.
    dtype: str = "float32"
    # Fraction of each sequence that recursion r keeps (expert-choice), one value per recursion, in (0, 1] and
    # non-increasing. Empty: the default (N_r - r) / N_r for r = 0 .. N_r - 1, i.e. 1, 2/3, 1/3 for N_r = 3.
    capacities: tuple = ()
    # Gate scale alpha: gate = alpha * sigmoid(router logit).
    gate_scale: float = 0.1
    # If false, kept tokens are updated as Block(h) instead of h + gate * Block(h) (used to compare with "recursive").
    gating: bool = True
    # Coefficient of the auxiliary BCE loss that teaches the router's sigmoid to predict top-k membership.
    router_bce_coef: float = 0.001

    @property
    def block_layers(self) -> int:
        """Number of distinct layers in the shared recursion block."""
        return (self.num_layers - 2) // self.num_recursions

    def capacity_fractions(self) -> tuple[float, ...]:
        """Return the capacity of every recursion, filling in the default schedule."""
        if self.capacities:
            return tuple(float(c) for c in self.capacities)
        n = self.num_recursions
        return tuple((n - r) / n for r in range(n))

    def kept_counts(self, seq_len: int) -> tuple[int, ...]:
        """Return k_r = max(1, floor(c_r * seq_len)), the tokens each recursion keeps per sequence."""
        # The small epsilon keeps floor(2/3 * 3) at 2 despite rounding in the float product.
        return tuple(max(1, int(c * seq_len + 1e-9)) for c in self.capacity_fractions())


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Corpus, tokenizer and batching."""

    # "shakespeare": the embedded corpus in data/ with its fixed held-out works. "files": train_paths / val_paths.
    source: str = "shakespeare"
    # Training files or glob patterns (UTF-8 text, or JSONL with one document per line) for source="files".
    train_paths: tuple = ()
    # Validation files or globs for source="files". Empty: hold out the last val_fraction of the training documents.
    val_paths: tuple = ()
    # Share of documents held out for validation when val_paths is empty.
    val_fraction: float = 0.05
    # Name of the string field holding the document in JSONL files.
    text_field: str = "text"
    # Tokenizer: "byte" (256 byte ids plus EOS and PAD).
    tokenizer: str = "byte"
    # Tokens per training row (each row contains seq_len + 1 tokens: inputs and shifted targets).
    seq_len: int = 256
    # Rows per optimizer step, over all processes and devices.
    batch_size: int = 16
    # Seed of the shuffle order of training rows.
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimizer, schedule, logging and checkpointing."""

    # Directory of the run: checkpoints, config.yaml, metrics.jsonl, TensorBoard events. Resumed if it has checkpoints.
    run_dir: str = "runs/default"
    # Number of optimizer steps.
    steps: int = 1000
    # Peak learning rate of the warmup-stable-decay schedule.
    learning_rate: float = 3e-3
    # Linear warmup length, in steps.
    warmup_steps: int = 100
    # Share of the steps, at the end, over which the learning rate decays linearly to zero.
    decay_fraction: float = 0.2
    # AdamW betas, decoupled weight decay and global gradient-norm clip.
    adam_b1: float = 0.9
    adam_b2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    # Seed of parameter initialisation.
    seed: int = 0
    # Steps between training-metric log lines (TensorBoard, metrics.jsonl, progress bar).
    log_every: int = 10
    # Steps between validation passes (0: only at the end).
    eval_every: int = 200
    # Validation batches of each periodic pass (0: the whole held-out split).
    eval_batches: int = 0
    # Validation batches of the final pass, whose figures train.py reports (0: the whole held-out split).
    final_eval_batches: int = 0
    # Steps between checkpoints (a checkpoint is also written at the last step).
    checkpoint_every: int = 200
    # Number of most recent checkpoints kept on disk.
    keep_checkpoints: int = 3
    # Show a tqdm progress bar.
    progress_bar: bool = True


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh axis rules."""

    # Sizes of the mesh axes; one of them may be -1 (inferred from the device count).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Logical axis name -> mesh axis (or list of mesh axes, or null for replicated).
    rules: tuple = (
        ("batch", ("data", "fsdp")),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("heads", "tensor"),
        ("kv_heads", "tensor"),
        ("kv", None),
        ("mlp", "tensor"),
        ("norm", None),
        ("recursions", None),
        ("layers", None),
        ("seq", None),
    )


@dataclasses.dataclass(frozen=True)
class Config:
    """A full run: model, data, training and mesh."""

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    mesh: MeshConfig = dataclasses.field(default_factory=MeshConfig)


_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "mesh": MeshConfig}


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Check `value` against a field annotation and convert it (int -> float, list -> tuple)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return _coerce(key, value, args[0])
    if annotation is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            # YAML 1.1 reads "1e-3" (no dot) as a string.
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if annotation is tuple:
        if isinstance(value, str):
            value = [value]
        if isinstance(value, (list, tuple)):
            return tuple(_freeze(v) for v in value)
        raise ConfigError(f"{key}: expected a list, got {value!r}")
    return value


def _freeze(value: Any) -> Any:
    if isinstance(value, list):
        return tuple(_freeze(v) for v in value)
    return value


def _build_section(name: str, cls, values: dict) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"{name}: expected a mapping of fields, got {values!r}")
    types_ = _field_types(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in types_:
            raise ConfigError(f"unknown config key {name}.{key}; valid keys of {name}: {', '.join(sorted(types_))}")
        kwargs[key] = _coerce(f"{name}.{key}", value, types_[key])
    return cls(**kwargs)


def config_from_dict(tree: dict) -> Config:
    """Build and validate a `Config` from a nested mapping such as a parsed YAML file."""
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError(f"a config must be a mapping with sections {', '.join(_SECTIONS)}, got {type(tree).__name__}")
    for section in tree:
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {', '.join(_SECTIONS)}")
    sections = {name: _build_section(name, cls, tree.get(name) or {}) for name, cls in _SECTIONS.items()}
    config = Config(**sections)
    validate(config)
    return config


def config_to_dict(config: Config) -> dict:
    """Return the config as plain nested dicts and lists (YAML and JSON serialisable)."""

    def thaw(value):
        if isinstance(value, tuple):
            return [thaw(v) for v in value]
        return value

    return {name: {k: thaw(v) for k, v in dataclasses.asdict(getattr(config, name)).items()} for name in _SECTIONS}


def parse_override(text: str) -> tuple[list[str], Any]:
    """Split `section.field=value` into its key path and its YAML-parsed value."""
    if "=" not in text:
        raise ConfigError(f"invalid override {text!r}: expected section.field=value, e.g. train.steps=100")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if len(path) != 2 or not all(path):
        raise ConfigError(f"invalid override key {key!r}: expected section.field, e.g. train.steps")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as error:
        raise ConfigError(f"invalid value in override {text!r}: {error}") from None
    return path, value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    """Return a copy of `tree` with dotted `section.field=value` overrides applied."""
    tree = {k: dict(v or {}) for k, v in (tree or {}).items()}
    for text in overrides:
        (section, field), value = parse_override(text)
        if section not in _SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in override {text!r}; valid: {', '.join(_SECTIONS)}")
        valid = _field_types(_SECTIONS[section])
        if field not in valid:
            raise ConfigError(
                f"unknown config key {section}.{field} in override {text!r}; "
                f"valid keys of {section}: {', '.join(sorted(valid))}"
            )
        tree.setdefault(section, {})[field] = value
    return tree


def read_yaml(path: str) -> dict:
    """Parse a YAML config file with the safe loader."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            tree = yaml.safe_load(handle)
    except (yaml.YAMLError, UnicodeDecodeError) as error:
        detail = str(error).replace("\n", " ")
        raise ConfigError(f"malformed YAML in {path}: {detail}") from None
    if tree is not None and not isinstance(tree, dict):
        raise ConfigError(f"{path}: a config must be a mapping with sections {', '.join(_SECTIONS)}")
    return tree or {}


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> Config:
    """Load a YAML preset (or the defaults when `path` is None) and apply dotted overrides."""
    tree = read_yaml(path) if path else {}
    return config_from_dict(apply_overrides(tree, list(overrides or [])))


def save_config(config: Config, path: str) -> None:
    """Write the config as YAML, readable by `load_config`."""
    with open(path, "w", encoding="utf-8") as handle:
        yaml.safe_dump(config_to_dict(config), handle, sort_keys=False)


def _choice(key: str, value: str, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}={value!r} is not supported; allowed values: {', '.join(allowed)}")


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key}={value} must be > 0")


def validate(config: Config) -> None:
    """Raise `ConfigError` for any invalid field or combination of fields."""
    m, d, t = config.model, config.data, config.train
    _choice("model.kind", m.kind, KINDS)
    _choice("model.routing", m.routing, ROUTINGS)
    _choice("model.sharing", m.sharing, SHARINGS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.tokenizer", d.tokenizer, TOKENIZERS)
    for key in ("num_layers", "num_recursions", "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "d_ff", "max_seq_len", "rope_theta", "norm_eps", "init_std"):
        _positive(f"model.{key}", getattr(m, key))
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    if m.kind != "vanilla":
        if m.num_layers < 3:
            raise ConfigError(f"model.num_layers={m.num_layers}: middle-cycle sharing needs at least 3 layers")
        if (m.num_layers - 2) % m.num_recursions:
            lower = 2 + (m.num_layers - 2) // m.num_recursions * m.num_recursions
            upper = lower + m.num_recursions
            suggestion = f"{upper}" if lower < 2 + m.num_recursions else f"{lower} or {upper}"
            raise ConfigError(
                f"model.num_layers={m.num_layers}: middle-cycle sharing needs (num_layers - 2) divisible by "
                f"model.num_recursions={m.num_recursions}; nearest valid num_layers: {suggestion}"
            )
    caps = m.capacity_fractions()
    if m.capacities:
        if len(caps) != m.num_recursions:
            raise ConfigError(
                f"model.capacities has {len(caps)} values but model.num_recursions={m.num_recursions}; "
                f"give one capacity per recursion"
            )
        for r, c in enumerate(caps):
            if not 0.0 < c <= 1.0:
                raise ConfigError(f"model.capacities[{r}]={c} must be in (0, 1]")
        for r in range(1, len(caps)):
            if caps[r] > caps[r - 1]:
                raise ConfigError(
                    f"model.capacities={list(caps)} must be non-increasing (recursion {r} keeps a subset of "
                    f"recursion {r - 1})"
                )
    if m.gate_scale <= 0:
        raise ConfigError(f"model.gate_scale={m.gate_scale} must be > 0")
    if m.router_bce_coef < 0:
        raise ConfigError(f"model.router_bce_coef={m.router_bce_coef} must be >= 0")
    if d.seq_len <= 0:
        raise ConfigError(f"data.seq_len={d.seq_len} must be > 0")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; lower data.seq_len or raise "
            f"model.max_seq_len"
        )
    _positive("data.batch_size", d.batch_size)
    if d.source == "files" and not d.train_paths:
        raise ConfigError("data.source=files needs data.train_paths (a list of files or glob patterns)")
    if not 0.0 < d.val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction={d.val_fraction} must be in (0, 1)")
    for key in ("steps", "learning_rate", "log_every", "checkpoint_every", "keep_checkpoints"):
        _positive(f"train.{key}", getattr(t, key))
    for key in ("warmup_steps", "eval_every", "eval_batches", "final_eval_batches", "weight_decay", "grad_clip"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in [0, 1]")
    for key in ("adam_b1", "adam_b2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be in [0, 1)")
    if not t.run_dir:
        raise ConfigError("train.run_dir must not be empty")
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: use positive sizes and at "
                          f"most one -1")
