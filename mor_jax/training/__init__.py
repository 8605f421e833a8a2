"""Training: mesh and shardings, train state and optimizer, steps, checkpoints and the loop."""

from mor_jax.training.loop import train

__all__ = ["train"]
