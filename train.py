"""Train a mor_jax model: python train.py --config configs/default.yaml [section.field=value ...]"""

import argparse

from mor_jax.cli import print_json_line, run_main


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Train a vanilla, recursive or Mixture-of-Recursions language model. The run directory is "
        "train.run_dir; an existing run directory with checkpoints is resumed.",
    )
    parser.add_argument("--config", default="configs/default.yaml", help="YAML preset (default: %(default)s)")
    parser.add_argument("overrides", nargs="*", metavar="section.field=value",
                        help="config overrides, e.g. train.steps=200 train.run_dir=runs/test")
    args = parser.parse_args()

    from mor_jax.config import load_config
    from mor_jax.training import train
    from mor_jax.training.distributed import initialize

    config = load_config(args.config, args.overrides)
    initialize(config.mesh)  # multi-process runs only; before anything touches a JAX device
    print_json_line(train(config))


if __name__ == "__main__":
    run_main(main)
