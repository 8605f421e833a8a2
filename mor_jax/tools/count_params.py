"""Count the parameters of the models that YAML configs describe, without allocating them.

    python -m mor_jax.tools.count_params configs/paper/360m_mor_ec_nr3.yaml [CONFIG ...] [--json]

The count traces the model's `init` with `jax.eval_shape`, so only shapes are computed and a 1.7B-parameter config
takes about as long as a tiny one. Embeddings are tied, so the token embedding table is the only embedding
parameter; everything else, routers included, is counted as non-embedding.
"""

from __future__ import annotations

import argparse
import math
import sys

from mor_jax.cli import print_json_line, run_main
from mor_jax.config import RECURSIVE_KINDS, load_config

# Path of the token embedding table in the parameter tree of `LanguageModel`.
EMBEDDING_PATH = ("embed", "embedding")
COLUMNS = ("config", "kind", "routing", "layers", "N_r", "non-embedding", "embedding", "total")


def _key_name(key) -> str:
    return str(getattr(key, "key", getattr(key, "name", key)))


def parameter_shapes(model_config) -> dict[tuple[str, ...], tuple[int, ...]]:
    """Return {parameter path: shape} of the model that `model_config` describes, traced with `jax.eval_shape`."""
    # Imported here so that a missing or invalid config is reported without the cost of importing JAX.
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from mor_jax.model import build_model

    model = build_model(model_config)
    abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    params = nn.unbox(abstract["params"])
    leaves = jax.tree_util.tree_leaves_with_path(params)
    return {tuple(_key_name(k) for k in path): tuple(leaf.shape) for path, leaf in leaves}


def count_parameters(path: str) -> dict:
    """Load the config at `path` and return its parameter counts and model shape as a flat dict.

    Only the trainable `params` collection is counted; the loss-free balancing bias is a separate, non-trainable
    collection.
    """
    config = load_config(path)
    m = config.model
    shapes = parameter_shapes(m)
    sizes = {name: math.prod(shape) for name, shape in shapes.items()}
    if EMBEDDING_PATH not in sizes:
        # A renamed embedding would otherwise be counted as non-embedding without any warning.
        raise RuntimeError(f"no parameter at {'/'.join(EMBEDDING_PATH)}; update EMBEDDING_PATH in {__name__}")
    embedding = sizes[EMBEDDING_PATH]
    total = sum(sizes.values())
    # Router weights, decoding-only auxiliary routers included, are the parameters with "router" in a path part
    # (recursion/router_kernel, for example).
    router = sum(size for name, size in sizes.items() if any("router" in part for part in name))
    recursive = m.kind in RECURSIVE_KINDS
    return {
        "config": path,
        "kind": m.kind,
        "routing": m.routing if m.kind == "mor" else None,
        "num_layers": m.num_layers,
        "num_recursions": m.num_recursions if recursive else None,
        "non_embedding_params": total - embedding,
        "embedding_params": embedding,
        "total_params": total,
        "router_params": router,
    }


def format_table(rows: list[dict]) -> str:
    """Render count_parameters() results as an aligned text table with thousands separators."""

    def cells(row: dict) -> list[str]:
        return [
            row["config"],
            row["kind"],
            row["routing"] or "-",
            str(row["num_layers"]),
            "-" if row["num_recursions"] is None else str(row["num_recursions"]),
            f"{row['non_embedding_params']:,}",
            f"{row['embedding_params']:,}",
            f"{row['total_params']:,}",
        ]

    table = [list(COLUMNS)] + [cells(row) for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    lines = []
    for line in table:
        # Text columns are left-aligned, the five numeric columns right-aligned.
        parts = [cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths))]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m mor_jax.tools.count_params",
        description="Print the parameter counts of the models that YAML configs describe (no memory is allocated "
        "for the parameters). Non-embedding counts exclude only the tied token embedding table.",
    )
    parser.add_argument("configs", nargs="+", metavar="CONFIG", help="YAML config files, e.g. configs/paper/*.yaml")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON object per config and line instead of a table")
    args = parser.parse_args(argv)

    rows = [count_parameters(path) for path in args.configs]
    if args.json:
        for row in rows:
            print_json_line(row)
    else:
        print(format_table(rows))


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
