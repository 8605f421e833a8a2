"""Load a trained run, evaluate it on the held-out split, and generate text from it.

`load_run` is the notebook entry point:

    run = load_run("runs/default")
    logits, aux = run.model.apply(run.variables, tokens)
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax

from mor_jax.config import Config, MeshConfig, MorJaxError, load_config
from mor_jax.data import Tokenizer, load_documents, make_tokenizer, make_val_batches, pack_documents
from mor_jax.inference import SamplingParams, generate
from mor_jax.model import LanguageModel, build_model
from mor_jax.training import checkpoint as ckpt
from mor_jax.training.evaluation import evaluate_batches
from mor_jax.training.mesh import batch_sharding, logical_rules, make_mesh
from mor_jax.training.state import abstract_state, make_optimizer, state_shardings
from mor_jax.training.steps import make_eval_step


@dataclasses.dataclass
class LoadedRun:
    """A restored checkpoint: everything needed to run the model."""

    config: Config
    model: LanguageModel
    params: Any
    tokenizer: Tokenizer
    step: int
    run_dir: str
    # Non-trainable variables by collection (the loss-free balancing bias of token-choice routers).
    model_state: dict = dataclasses.field(default_factory=dict)

    @property
    def variables(self) -> dict:
        """All model variables, ready for `model.apply(run.variables, tokens)`."""
        return {"params": self.params, **self.model_state}


def load_run(run_dir: str, step: Optional[int] = None) -> LoadedRun:
    """Restore the latest (or the given) checkpoint of a run directory written by `train`.

    Parameters are replicated over the local devices, whatever mesh the run was trained on.
    """
    config_path = os.path.join(run_dir, ckpt.CONFIG_FILE)
    if not os.path.isdir(run_dir):
        raise MorJaxError(f"run directory not found: {run_dir}")
    if not os.path.isfile(config_path):
        raise MorJaxError(f"{run_dir} has no {ckpt.CONFIG_FILE}; it is not a mor_jax run directory")
    config = load_config(config_path)
    if not os.path.isdir(ckpt.checkpoint_dir(run_dir)):
        raise MorJaxError(f"{run_dir} has no checkpoints yet; train it first")
    # Orbax lists every numbered directory; only those with a commit marker and both items are complete.
    available = ckpt.scan_checkpoints(run_dir).complete
    manager = ckpt.make_manager(run_dir, read_only=True)
    if not available:
        raise MorJaxError(f"{run_dir} has no complete checkpoint; train it first")
    if step is None:
        step = max(available)
    elif step not in available:
        raise MorJaxError(f"no checkpoint for step {step} in {run_dir}; available steps: {sorted(available)}")

    mesh_config = MeshConfig(data=-1, fsdp=1, tensor=1, rules=config.mesh.rules)
    mesh = make_mesh(mesh_config)
    rules = logical_rules(mesh_config)
    model = build_model(config.model)
    optimizer = make_optimizer(config.train, config.model)
    shardings = state_shardings(config, model, optimizer, mesh, rules)
    target = ckpt.abstract_target(abstract_state(config, model, optimizer), shardings)
    state = ckpt.restore(manager, step, target)
    manager.close()
    return LoadedRun(config, model, state.params, make_tokenizer(config.data), int(step), os.path.abspath(run_dir),
                     dict(state.model_state))


def evaluate_run(run: LoadedRun, max_batches: int = 0) -> dict:
    """Held-out loss, bits per byte, perplexity and routing statistics of a loaded run."""
    config = run.config
    _, val_docs = load_documents(config.data)
    rows = pack_documents(val_docs, run.tokenizer, config.data.seq_len)
    batches = make_val_batches(config.data, rows)
    mesh = make_mesh(MeshConfig(data=-1, fsdp=1, tensor=1))
    sharding = batch_sharding(mesh, logical_rules(config.mesh))
    eval_step = jax.jit(make_eval_step(run.model, run.tokenizer.pad_id, run.tokenizer.token_byte_lengths()))
    with jax.set_mesh(mesh):
        result = evaluate_batches(eval_step, run.variables, batches, sharding, max_batches)
    result["step"] = run.step
    return result


def generate_text(
    run: LoadedRun,
    prompt: str,
    max_new_tokens: int = 200,
    temperature: float = 0.8,
    seed: int = 0,
    top_k: int = 0,
    top_p: float = 1.0,
) -> str:
    """Sample a continuation of `prompt` with the KV-cached serving engine (`mor_jax.inference.generate`).

    Expert-choice recursions route causally (sigmoid(router logit) >= 0.5), so a token's depth never depends on
    tokens after it, and tokens whose router stops them skip the remaining recursions. The prompt plus
    max_new_tokens must fit model.max_seq_len. temperature=0 is greedy decoding.
    """
    if max_new_tokens < 0:
        raise MorJaxError(f"max_new_tokens={max_new_tokens} must be >= 0")
    if max_new_tokens == 0:
        return ""
    sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    return generate(run.config.model, run.variables, run.tokenizer, [prompt], max_new_tokens, sampling)[0]
