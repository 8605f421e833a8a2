"""Typed run configuration: dataclasses, YAML presets and dotted command-line overrides.

A run is described by one `Config` (model, data, train, mesh). Presets live in `configs/*.yaml`; any field can be
overridden as `section.field=value`, e.g. `train.steps=500` or `model.capacities=[1.0,0.5]`. Unknown keys, wrong types
and invalid values raise `ConfigError` naming the key and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from typing import Any, Optional

import yaml


class MorJaxError(Exception):
    """Base class for errors caused by user input; CLIs print the message on one line and exit non-zero."""


class ConfigError(MorJaxError, ValueError):
    """Invalid configuration file, key or value."""


KINDS = ("vanilla", "recursive", "mor", "mod", "dllm", "lot")
# Kinds with a shared recursion block (the MoR family); the others have num_layers distinct layers.
RECURSIVE_KINDS = ("recursive", "mor")
# Peer systems: Mixture-of-Depths, D-LLM and Leap-of-Thought.
PEER_KINDS = ("mod", "dllm", "lot")
ROUTINGS = ("expert_choice", "token_choice")
SHARINGS = ("cycle", "sequence", "middle_cycle", "middle_sequence")
ROUTER_FUNCTIONS = ("sigmoid", "tanh")
ROUTER_TYPES = ("linear", "mlp")
CAUSALITY_FIXES = ("bce", "aux_router")
BALANCINGS = ("loss", "loss_free")
KV_STRATEGIES = ("recursion_wise_caching", "recursive_sharing")
EXECUTIONS = ("masked", "gathered")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "save_dots")
DATA_SOURCES = ("shakespeare", "files")
TOKENIZERS = ("byte",)
NONFINITE_POLICIES = ("skip", "stop")
MULTI_PROCESS_MODES = ("auto", "cluster", "off")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of the language model."""

    # "vanilla": num_layers distinct layers. "recursive": middle-cycle sharing, every token through every recursion.
    # "mor": middle-cycle sharing with a router choosing which tokens each recursion processes.
    # Peer systems, each with num_layers distinct layers. "mod" (Mixture-of-Depths): every mod_every-th layer
    # processes only the top mod_capacity of each sequence. "dllm" (D-LLM): a decision module before every layer
    # executes or skips each token. "lot" (Leap-of-Thought): a router per layer lets tokens leap over it, and a causal
    # summary of the leaped tokens stays visible. See mor_jax/model/mixture_of_depths.py, dllm.py, leap_of_thought.py.
    kind: str = "mor"
    # Routing scheme for kind="mor". "expert_choice": each recursion keeps the top-k tokens of every sequence.
    # "token_choice": one router assigns each token its depth after the prelude.
    routing: str = "expert_choice"
    # Parameter-sharing strategy of the recursive models, mapping unrolled layer l to a unique layer:
    # "cycle" l mod (L / N_r); "sequence" l // N_r; "middle_cycle" and "middle_sequence" keep the first and last
    # layers unique and apply cycle or sequence to the L - 2 layers between them.
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
    # Gate scale alpha. Empty (null): 0.1 for expert-choice (gate = alpha * sigmoid(logit)) and 1.0 for token-choice
    # (gate = alpha * softmax(logits)).
    gate_scale: Optional[float] = None
    # If false, kept tokens are updated as Block(h) instead of h + gate * Block(h) (used to compare with "recursive").
    gating: bool = True
    # Expert-choice router nonlinearity: "sigmoid" or "tanh" (gate = alpha * tanh(logit)).
    router_function: str = "sigmoid"
    # Router network: "linear" (d_model -> outputs, no bias) or "mlp" (d_model -> router_mlp_dim -> outputs, GELU).
    router_type: str = "linear"
    # Hidden width of the MLP router (0: d_model).
    router_mlp_dim: int = 0
    # How expert-choice routing becomes causal for decoding: "bce" trains the router's logits against top-k
    # membership; "aux_router" trains a separate linear router on stop_gradient(input) for decoding only.
    causality: str = "bce"
    # Coefficient of the auxiliary BCE loss (of the router with causality="bce", of the auxiliary router otherwise).
    router_bce_coef: float = 0.001
    # Learning-rate multiplier of the auxiliary router's own optimizer (causality="aux_router").
    aux_router_lr_multiplier: float = 10.0
    # Coefficient of the router z-loss: mean squared logit (expert-choice) or mean squared logsumexp (token-choice).
    router_z_loss_coef: float = 0.0
    # Expert-choice capacity warm-up: capacities go from 1.0 to their targets along a cosine over this many steps.
    capacity_warmup_steps: int = 0
    # Token-choice balancing: "loss" (sum_i P_i f_i, coefficient balance_loss_coef) or "loss_free" (a non-trainable
    # bias on the routing scores, moved by bias_update_rate * sign(mean load - load) after every optimizer step).
    balancing: str = "loss"
    balance_loss_coef: float = 0.1
    bias_update_rate: float = 0.001
    # "recursion_wise_caching": recursion r attends among the tokens active at r. "recursive_sharing": keys and
    # values computed at the first recursion are reused by every later recursion; only queries shrink.
    kv_strategy: str = "recursion_wise_caching"
    # "gathered": each recursion computes only its selected tokens (k_r per sequence, or the token-choice capacity
    # buffer), which saves compute. "masked": every token runs every recursion and a mask selects the updates (the
    # exact reference; needed for capacity warm-up). Decoding-style causal routing always uses the masked path.
    execution: str = "gathered"
    # Token-choice buffers on the gathered path: capacity_factor x the share of tokens that reach each recursion
    # under balanced routing. Tokens beyond a full buffer stop early (logged as overflow_fraction).
    capacity_factor: float = 1.0
    # Rematerialisation of every decoder layer in the backward pass (jax.checkpoint through flax.linen.remat).
    # "none": keep all activations. "full": keep only each layer's inputs and recompute the rest. "save_dots": keep
    # the outputs of matmuls against weights (jax.checkpoint_policies.dots_with_no_batch_dims_saveable) and
    # recompute attention scores, norms and activations. The gradients are the same up to float rounding.
    remat: str = "none"
    # Mixture-of-Depths: fraction of each sequence that a routed layer processes, k = max(1, floor(c * seq)) tokens.
    mod_capacity: float = 0.125
    # Mixture-of-Depths: layers mod_every - 1, 2 * mod_every - 1, ... are routed (2: every other layer, starting
    # with the second); the other layers process every token.
    mod_every: int = 2
    # D-LLM and Leap-of-Thought: target fraction of (token, layer) pairs that execute, in (0, 1].
    target_execution_rate: float = 0.5
    # D-LLM and Leap-of-Thought: coefficient of the rate loss (executed fraction - target_execution_rate)^2. Our
    # choice: at 1.0 the LM loss held the rate of a small test model far above a target of 0.2.
    rate_loss_coef: float = 10.0
    # D-LLM: tokens at positions 0 .. dllm_always_execute - 1 execute every layer, whatever the decision module decides.
    dllm_always_execute: int = 4

    @property
    def effective_gate_scale(self) -> float:
        """Gate scale alpha with the routing's default filled in."""
        if self.gate_scale is not None:
            return float(self.gate_scale)
        return 1.0 if self.routing == "token_choice" else 0.1

    @property
    def recursion_start(self) -> int:
        """Number of unique layers before the recursion block (1 for the middle strategies)."""
        return 1 if self.sharing.startswith("middle") else 0

    @property
    def recursion_layers(self) -> int:
        """Number of unrolled layers inside the recursions."""
        return self.num_layers - 2 * self.recursion_start

    @property
    def block_layers(self) -> int:
        """Number of layers one recursion applies (the unique layers of the recursion part)."""
        return self.recursion_layers // self.num_recursions

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
    # Forward-FLOP budget of the run (as the MoR paper counts compute). When > 0 it replaces `steps` by
    # budget / (forward FLOPs per sequence x data.batch_size).
    flop_budget: float = 0.0
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
    # What a step whose loss, gradients or updated state contain NaN or infinity does. "skip": keep the parameters
    # and optimizer state of the step before, count the step and go on. "stop": end the run with an error at once.
    nonfinite: str = "skip"
    # With nonfinite="skip", the run stops with an error at this many skipped steps, counted since the process
    # started (a resumed run starts counting again).
    max_nonfinite_steps: int = 10
    # Gradient accumulation: each step splits data.batch_size into this many micro-batches of equal rows, computes
    # them one after another and sums their gradients, so activation memory is that of one micro-batch. The LM loss
    # is normalised by the tokens of the whole batch. Exact for vanilla and expert-choice (top-k is per sequence);
    # token-choice's balancing loss multiplies two batch means, so micro-batches average it instead.
    microbatches: int = 1


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh and the logical-to-mesh axis rules."""

    # Sizes of the mesh axes; one of them may be -1 (inferred from the device count).
    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    # Multi-process start-up (jax.distributed.initialize, see mor_jax/training/distributed.py). "auto": only when
    # the environment sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID. "cluster": always, with
    # JAX's auto-detection (Cloud TPU pod slices, Slurm, Open MPI). "off": never.
    multi_process: str = "auto"
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


def _nearest_layer_counts(m: ModelConfig) -> str:
    fixed = 2 * m.recursion_start
    lower = fixed + (m.num_layers - fixed) // m.num_recursions * m.num_recursions
    upper = lower + m.num_recursions
    if lower < fixed + m.num_recursions:
        return f"{upper}"
    return f"{lower} or {upper}"


def _validate_model(m: ModelConfig) -> None:
    _choice("model.kind", m.kind, KINDS)
    _choice("model.routing", m.routing, ROUTINGS)
    _choice("model.sharing", m.sharing, SHARINGS)
    _choice("model.dtype", m.dtype, DTYPES)
    _choice("model.remat", m.remat, REMATS)
    _choice("model.router_function", m.router_function, ROUTER_FUNCTIONS)
    _choice("model.router_type", m.router_type, ROUTER_TYPES)
    _choice("model.causality", m.causality, CAUSALITY_FIXES)
    _choice("model.balancing", m.balancing, BALANCINGS)
    _choice("model.kv_strategy", m.kv_strategy, KV_STRATEGIES)
    _choice("model.execution", m.execution, EXECUTIONS)
    if m.capacity_factor <= 0:
        raise ConfigError(f"model.capacity_factor={m.capacity_factor} must be > 0")
    if m.execution == "gathered" and m.capacity_warmup_steps:
        raise ConfigError(
            "model.capacity_warmup_steps changes the capacities every step, which the gathered path compiles as "
            "static sizes; set model.execution=masked or model.capacity_warmup_steps=0"
        )
    for key in ("num_layers", "num_recursions", "vocab_size", "d_model", "num_heads", "num_kv_heads", "head_dim",
                "d_ff", "max_seq_len", "rope_theta", "norm_eps", "init_std"):
        _positive(f"model.{key}", getattr(m, key))
    if m.head_dim % 2:
        raise ConfigError(f"model.head_dim={m.head_dim} must be even (RoPE rotates pairs of dimensions)")
    if m.num_heads % m.num_kv_heads:
        raise ConfigError(f"model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={m.num_kv_heads}")
    if m.kind in RECURSIVE_KINDS:
        fixed = 2 * m.recursion_start
        if m.num_layers < fixed + m.num_recursions:
            raise ConfigError(
                f"model.num_layers={m.num_layers} is too small for {m.sharing} sharing with "
                f"model.num_recursions={m.num_recursions}; use at least {fixed + m.num_recursions}"
            )
        if (m.num_layers - fixed) % m.num_recursions:
            what = "(num_layers - 2)" if fixed else "num_layers"
            raise ConfigError(
                f"model.num_layers={m.num_layers}: {m.sharing} sharing needs {what} divisible by "
                f"model.num_recursions={m.num_recursions}; nearest valid num_layers: {_nearest_layer_counts(m)}"
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
    if m.gate_scale is not None and m.gate_scale <= 0:
        raise ConfigError(f"model.gate_scale={m.gate_scale} must be > 0 (or null for the routing's default)")
    for key in ("router_bce_coef", "router_z_loss_coef", "balance_loss_coef", "bias_update_rate", "aux_router_lr_multiplier",
                "capacity_warmup_steps", "router_mlp_dim"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 0")
    if m.kv_strategy == "recursive_sharing":
        if m.kind not in RECURSIVE_KINDS:
            raise ConfigError(
                f"model.kv_strategy=recursive_sharing needs recursions, which model.kind={m.kind} has not; use "
                f"model.kind=recursive or mor, or kv_strategy=recursion_wise_caching"
            )
        if m.kind == "mor" and m.routing == "expert_choice" and caps[0] < 1.0:
            raise ConfigError(
                f"model.kv_strategy=recursive_sharing reuses the first recursion's keys and values for every token, "
                f"so the first capacity must be 1.0, not {caps[0]}"
            )
    if m.kind == "mor" and m.routing == "token_choice":
        if m.capacities:
            raise ConfigError(
                "model.capacities applies to expert-choice routing only; token-choice assigns depths with its "
                "router (remove model.capacities or set model.routing=expert_choice)"
            )
        if m.capacity_warmup_steps:
            raise ConfigError("model.capacity_warmup_steps applies to expert-choice routing only; set it to 0")
        if m.router_function != "sigmoid" or m.causality != "bce":
            raise ConfigError(
                "model.router_function and model.causality apply to expert-choice routing only; token-choice "
                "uses a softmax router and is causal by construction (leave them at sigmoid and bce)"
            )
        if not m.gating:
            raise ConfigError("model.gating=false is only supported for expert-choice routing")
    _validate_peers(m)


def _validate_peers(m: ModelConfig) -> None:
    if not 0.0 < m.mod_capacity <= 1.0:
        raise ConfigError(f"model.mod_capacity={m.mod_capacity} must be in (0, 1]; Mixture-of-Depths uses 0.125")
    if not 1 <= m.mod_every <= m.num_layers:
        raise ConfigError(f"model.mod_every={m.mod_every} must be in 1 .. model.num_layers={m.num_layers} "
                          f"(2 routes every other layer)")
    if not 0.0 < m.target_execution_rate <= 1.0:
        raise ConfigError(f"model.target_execution_rate={m.target_execution_rate} must be in (0, 1]")
    for key in ("rate_loss_coef", "dllm_always_execute"):
        if getattr(m, key) < 0:
            raise ConfigError(f"model.{key}={getattr(m, key)} must be >= 0")
    if m.kind in ("dllm", "lot") and m.execution != "masked":
        raise ConfigError(
            f"model.kind={m.kind} decides per token and layer whether to execute, so the executed count is not a "
            f"static size that model.execution={m.execution} could gather; set model.execution=masked"
        )
    if m.kind in PEER_KINDS and m.capacity_warmup_steps:
        raise ConfigError(f"model.capacity_warmup_steps applies to kind=mor only, not model.kind={m.kind}; set it "
                          f"to 0")


def validate(config: Config) -> None:
    """Raise `ConfigError` for any invalid field or combination of fields."""
    m, d, t = config.model, config.data, config.train
    _validate_model(m)
    _choice("data.source", d.source, DATA_SOURCES)
    _choice("data.tokenizer", d.tokenizer, TOKENIZERS)
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
    for key in ("warmup_steps", "eval_every", "eval_batches", "final_eval_batches", "weight_decay", "grad_clip",
                "flop_budget"):
        if getattr(t, key) < 0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be >= 0")
    if not 0.0 <= t.decay_fraction <= 1.0:
        raise ConfigError(f"train.decay_fraction={t.decay_fraction} must be in [0, 1]")
    for key in ("adam_b1", "adam_b2"):
        if not 0.0 <= getattr(t, key) < 1.0:
            raise ConfigError(f"train.{key}={getattr(t, key)} must be in [0, 1)")
    if not t.run_dir:
        raise ConfigError("train.run_dir must not be empty")
    for key in ("learning_rate", "weight_decay", "grad_clip"):
        if not math.isfinite(getattr(t, key)):
            raise ConfigError(f"train.{key}={getattr(t, key)} must be a finite number")
    _choice("train.nonfinite", t.nonfinite, NONFINITE_POLICIES)
    _positive("train.max_nonfinite_steps", t.max_nonfinite_steps)
    _positive("train.microbatches", t.microbatches)
    if d.batch_size % t.microbatches:
        raise ConfigError(f"data.batch_size={d.batch_size} is not divisible by train.microbatches={t.microbatches}; "
                          f"use a divisor of the batch size")
    _choice("mesh.multi_process", config.mesh.multi_process, MULTI_PROCESS_MODES)
    sizes = [config.mesh.data, config.mesh.fsdp, config.mesh.tensor]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh sizes data={sizes[0]} fsdp={sizes[1]} tensor={sizes[2]}: use positive sizes and at "
                          f"most one -1")
