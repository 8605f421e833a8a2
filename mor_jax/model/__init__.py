"""Model definitions: layers, expert-choice routing and the language models."""

from mor_jax.model.routing import router_bce_loss, top_k_indices, top_k_mask
from mor_jax.model.transformer import LanguageModel, build_model, init_params, init_variables

__all__ = ["LanguageModel", "build_model", "init_params", "init_variables", "router_bce_loss", "top_k_indices", "top_k_mask"]
