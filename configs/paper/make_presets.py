"""Write the YAML presets of the model family in Bae et al., "Mixture-of-Recursions" (arXiv 2507.10524).

Run from anywhere: `python configs/paper/make_presets.py`. It (re)writes configs/paper/<base>_<variant>[_nr<N>].yaml
next to this script and loads every file back with `mor_jax.config.load_config`, so an invalid preset fails here.

Each of the four bases gets a vanilla preset, the peer systems MoR is compared with (Mixture-of-Depths, D-LLM and
Leap-of-Thought, with the base's layers) and, for N_r in 2, 3 and 4, a recursive, an expert-choice MoR and a
token-choice MoR preset, all with middle-cycle sharing. Middle-cycle sharing needs (L - 2) divisible by N_r. Where the
base's L is not, the preset uses the smallest larger L that is, because the paper adds layers in that case.
"""

from __future__ import annotations

import dataclasses
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
# The script lives two levels below the repository root, which is not on sys.path when it is run by file name.
sys.path.insert(0, ROOT)

from mor_jax.config import load_config  # noqa: E402

RECURSIONS = (2, 3, 4)
VOCAB_SIZE = 49152
SEQ_LEN = 2048
HEAD_DIM = 64
# Placeholder step count: the paper trains each model to a fixed FLOP budget, not to a number of steps.
PLACEHOLDER_STEPS = 10000
# Our choice, not the paper's: 5% of PLACEHOLDER_STEPS, about 1.05B tokens at 1024 x 2048 tokens per step.
WARMUP_STEPS = 500


@dataclasses.dataclass(frozen=True)
class Base:
    """One base model of the paper's family (head_dim 64, vocab 49,152, context 2,048 for all)."""

    label: str  # as the paper writes it, e.g. "360M"
    prefix: str  # file-name prefix, e.g. "360m"
    num_layers: int
    d_model: int
    num_heads: int
    num_kv_heads: int
    d_ff: int


BASES = (
    Base("135M", "135m", 30, 576, 9, 3, 1536),
    Base("360M", "360m", 32, 960, 15, 5, 2560),
    Base("730M", "730m", 26, 1536, 24, 8, 4096),
    Base("1.7B", "1p7b", 24, 2048, 32, 32, 8192),
)


# Memory settings that make the batch of 1024 x 2048 tokens fit a TPU slice, per base prefix. Each was checked by
# compiling the MoR expert-choice N_r = 3 train step with mor_jax.tools.aot (docs/tpu.md): 360M on v5e:4x4 (16 GiB
# per chip), 1.7B on v5p:4x4x4 (95 GiB per chip). Bases without an entry were not checked and keep the defaults.
MEMORY_SETTINGS = {
    "360m": {"model": [],
             "train": [("microbatches", 64, "16 rows per micro-batch: 1 per chip on v5e:4x4")],
             "mesh": []},
    "1p7b": {"model": [("remat", "full", "recompute each layer in the backward pass")],
             "train": [("microbatches", 16, "64 rows per micro-batch: 1 per chip on v5p:4x4x4")],
             "mesh": [("data", 1, ""), ("fsdp", -1, "parameters and optimizer state sharded over all chips")]},
}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A model kind and routing applied to a base; num_recursions is None for the vanilla model."""

    name: str  # file-name part: vanilla, mod, dllm, lot, recursive, mor_ec, mor_tc
    label: str  # for the header comment
    kind: str
    routing: str | None = None
    num_recursions: int | None = None


def variants() -> list[Variant]:
    result = [
        Variant("vanilla", "vanilla (no sharing)", "vanilla"),
        Variant("mod", "Mixture-of-Depths (no sharing)", "mod"),
        Variant("dllm", "D-LLM (no sharing)", "dllm"),
        Variant("lot", "Leap-of-Thought (no sharing)", "lot"),
    ]
    for n in RECURSIONS:
        result.append(Variant("recursive", "recursive (no router)", "recursive", None, n))
        result.append(Variant("mor_ec", "MoR expert-choice", "mor", "expert_choice", n))
        result.append(Variant("mor_tc", "MoR token-choice", "mor", "token_choice", n))
    return result


def middle_cycle_layers(num_layers: int, num_recursions: int) -> int:
    """Return the smallest L' >= num_layers with (L' - 2) divisible by num_recursions."""
    layers = num_layers
    while (layers - 2) % num_recursions:
        layers += 1
    return layers


def file_name(base: Base, variant: Variant) -> str:
    if variant.num_recursions is None:
        return f"{base.prefix}_{variant.name}.yaml"
    return f"{base.prefix}_{variant.name}_nr{variant.num_recursions}.yaml"


def format_value(value) -> str:
    """Format a scalar as YAML that PyYAML reads back as the same type (1e-05 becomes 1.0e-5)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        text = repr(value)
        if "e" in text:
            # PyYAML follows YAML 1.1, which reads an exponent float only with a dot in the mantissa.
            mantissa, exponent = text.split("e")
            if "." not in mantissa:
                mantissa += ".0"
            text = f"{mantissa}e{int(exponent)}"
        return text
    return str(value)


def model_entries(base: Base, variant: Variant) -> list[tuple[str, object, str]]:
    """Return the model section as (key, value, inline comment) rows."""
    n = variant.num_recursions
    layers = base.num_layers if n is None else middle_cycle_layers(base.num_layers, n)
    layers_note = ""
    if layers != base.num_layers:
        layers_note = (f"the {base.label} base has {base.num_layers}; (L - 2) must be divisible by N_r = {n}, "
                       f"so layers are added as in the paper")

    rows = [("kind", variant.kind, "")]
    if variant.routing:
        rows.append(("routing", variant.routing, ""))
    if n is not None:
        rows.append(("sharing", "middle_cycle", ""))
    rows.append(("num_layers", layers, layers_note))
    if n is not None:
        rows.append(("num_recursions", n, ""))
    rows += [
        ("vocab_size", VOCAB_SIZE, "the paper's tokenizer size; see data.tokenizer"),
        ("d_model", base.d_model, ""),
        ("num_heads", base.num_heads, ""),
        ("num_kv_heads", base.num_kv_heads, ""),
        ("head_dim", HEAD_DIM, ""),
        ("d_ff", base.d_ff, ""),
        ("max_seq_len", SEQ_LEN, ""),
        ("dtype", "bfloat16", "activations; parameters stay float32"),
    ]

    if variant.routing == "expert_choice":
        rows += [
            ("gate_scale", 0.1, "gate = 0.1 * sigmoid(router logit); capacities: default (N_r - r) / N_r"),
            ("router_bce_coef", 0.001, "auxiliary BCE loss that makes the router usable for causal decoding"),
        ]
    elif variant.kind == "mod":
        rows += [
            ("mod_capacity", 0.125, "Mixture-of-Depths: a routed layer processes 12.5% of each sequence"),
            ("mod_every", 2, "every other layer is routed"),
            ("router_bce_coef", 0.001, "auxiliary BCE loss that makes the router usable for causal decoding"),
        ]
    elif variant.kind in ("dllm", "lot"):
        rows += [
            ("execution", "masked", "every token is computed; the decisions select the updates"),
            ("target_execution_rate", 0.5, "our choice: half of the (token, layer) pairs execute"),
            ("rate_loss_coef", 10.0, ""),
        ]
        if variant.kind == "dllm":
            rows += [
                ("dllm_always_execute", 4, "our choice: the first 4 tokens execute every layer"),
                ("router_type", "mlp", "decision module: d_model -> router_mlp_dim -> 1, GELU"),
                ("router_mlp_dim", 64, "our choice"),
            ]
    elif variant.routing == "token_choice":
        rows += [
            ("gate_scale", 1.0, "gate = softmax(router logits) of the chosen depth"),
            ("balancing", "loss", ""),
            ("balance_loss_coef", 0.1, ""),
            ("router_z_loss_coef", 1.0e-5, ""),
        ]
    return rows


def data_entries(base: Base, variant: Variant) -> list[tuple[str, object, str]]:
    # NOTE: mor_jax has no 49,152-entry tokenizer yet, so the presets train on bytes. Config validation does not
    # compare model.vocab_size with the tokenizer, and training only requires vocab_size >= 258 (the byte ids).
    return [
        ("source", "shakespeare", "placeholder corpus: 2,341 training rows, about 2.3 batches per epoch"),
        ("tokenizer", "byte", "no 49,152-entry tokenizer exists yet; bytes use 258 of the 49,152 ids"),
        ("seq_len", SEQ_LEN, ""),
        ("batch_size", 1024, "rows per step: 1024 x 2048 = 2.1M tokens"),
    ]


def train_entries(base: Base, variant: Variant) -> list[tuple[str, object, str]]:
    run_name = file_name(base, variant)[: -len(".yaml")]
    return [
        ("run_dir", f"runs/paper/{run_name}", ""),
        ("steps", PLACEHOLDER_STEPS, "placeholder: the paper trains to a FLOP budget; set steps from yours"),
        ("learning_rate", 3.0e-3, "AdamW peak learning rate"),
        ("warmup_steps", WARMUP_STEPS, "not from the paper: 5% of the placeholder steps; scale it with steps"),
        ("decay_fraction", 0.2, "warmup-stable-decay: linear decay to 0 over the last 20% of steps"),
        ("adam_b1", 0.9, ""),
        ("adam_b2", 0.95, ""),
        ("weight_decay", 0.1, ""),
        ("grad_clip", 1.0, "global gradient-norm clip"),
        ("log_every", 10, ""),
        ("eval_every", 1000, ""),
        ("eval_batches", 0, "0: the whole held-out split"),
        ("final_eval_batches", 0, ""),
        ("checkpoint_every", 1000, ""),
        ("keep_checkpoints", 3, ""),
    ]


def header(base: Base, variant: Variant) -> list[str]:
    n = variant.num_recursions
    layers = base.num_layers if n is None else middle_cycle_layers(base.num_layers, n)
    if n is None:
        shape = f"{layers} distinct layers"
        recursions = "N_r: none (no recursion)"
    else:
        block = (layers - 2) // n
        shape = f"prelude + {block}-layer block x {n} recursions + coda"
        recursions = f"N_r: {n}"
    return [
        f"# Base: {base.label}. Variant: {variant.label}.",
        f"# Unrolled layers: {layers} ({shape}). {recursions}.",
        "# Model family of Bae et al., \"Mixture-of-Recursions\" (arXiv 2507.10524), with its optimizer settings.",
        "# Generated by configs/paper/make_presets.py; edit the script and rerun it instead of editing this file.",
    ]


def render(base: Base, variant: Variant) -> str:
    lines = header(base, variant)
    sections = (
        ("model", model_entries(base, variant)),
        ("data", data_entries(base, variant)),
        ("train", train_entries(base, variant)),
    )
    memory = MEMORY_SETTINGS.get(base.prefix)
    if memory:
        sections = (
            ("model", sections[0][1] + memory["model"]),
            ("data", sections[1][1]),
            ("train", sections[2][1] + memory["train"]),
        )
        if memory["mesh"]:
            sections += (("mesh", memory["mesh"]),)
    for section, rows in sections:
        lines.append(f"{section}:")
        for key, value, comment in rows:
            line = f"  {key}: {format_value(value)}"
            if comment:
                line += f"  # {comment}"
            lines.append(line)
    return "\n".join(lines) + "\n"


def main() -> None:
    written = []
    for base in BASES:
        for variant in variants():
            path = os.path.join(HERE, file_name(base, variant))
            with open(path, "w", encoding="utf-8") as handle:
                handle.write(render(base, variant))
            load_config(path)  # raises ConfigError if the preset is invalid
            written.append(os.path.relpath(path, ROOT))
    print(f"wrote and loaded {len(written)} presets:")
    for path in written:
        print(f"  {path}")


if __name__ == "__main__":
    main()
