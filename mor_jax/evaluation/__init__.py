"""Loading trained runs, held-out evaluation and text generation."""

from mor_jax.evaluation.evaluate import evaluate_run, generate_text, load_run

__all__ = ["evaluate_run", "generate_text", "load_run"]
