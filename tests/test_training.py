"""End-to-end training on the smoke config: loss goes down, checkpoints round-trip, resume is exact, eval loads."""

import json
import os

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from mor_jax.config import ConfigError, load_config
from mor_jax.data import load_documents, make_tokenizer, make_train_dataset, pack_documents
from mor_jax.evaluation import evaluate_run, generate_text, load_run
from mor_jax.training import checkpoint as ckpt
from mor_jax.training import train

SMOKE = "configs/smoke.yaml"


def smoke(run_dir, *overrides):
    return load_config(SMOKE, [f"train.run_dir={run_dir}", *overrides])


def read_metrics(run_dir, prefix="train/loss"):
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        rows = [json.loads(line) for line in handle]
    return {row["step"]: row[prefix] for row in rows if prefix in row}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("smoke"))
    result = train(smoke(run_dir, "train.steps=60", "train.checkpoint_every=20"))
    return run_dir, result


def test_smoke_training_lowers_loss(trained_run):
    run_dir, result = trained_run
    losses = read_metrics(run_dir)
    first, last = losses[min(losses)], losses[max(losses)]
    assert last < first - 1.0, f"loss went from {first:.3f} to {last:.3f}"
    assert result["step"] == 60
    for key in ("step", "train_loss", "val_loss", "val_bits_per_byte", "tokens_per_second", "run_dir"):
        assert key in result
    assert np.isfinite(result["val_bits_per_byte"])


def test_checkpoints_keep_the_latest_three(trained_run):
    run_dir, _ = trained_run
    steps = ocp.CheckpointManager(ckpt.checkpoint_dir(run_dir)).all_steps()
    assert sorted(steps) == [20, 40, 60]
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    assert os.listdir(os.path.join(run_dir, "tensorboard"))


def test_load_run_and_evaluate(trained_run):
    run_dir, result = trained_run
    run = load_run(run_dir)
    assert run.step == 60
    evaluated = evaluate_run(run, max_batches=4)
    # The training run evaluated the same 4 validation batches with the same parameters.
    assert evaluated["val_loss"] == pytest.approx(result["val_loss"], rel=1e-6)
    assert len(evaluated["kept_fraction_per_recursion"]) == run.config.model.num_recursions
    assert 1.0 <= evaluated["mean_depth"] <= run.config.model.num_recursions
    text = generate_text(run, "ROMEO.\n", max_new_tokens=20, temperature=0.0)
    assert text == generate_text(run, "ROMEO.\n", max_new_tokens=20, temperature=0.0)
    assert len(text.encode("utf-8", "surrogateescape")) <= 20


def test_load_run_of_an_earlier_step(trained_run):
    run_dir, _ = trained_run
    assert load_run(run_dir, step=40).step == 40
    with pytest.raises(Exception, match="available steps"):
        load_run(run_dir, step=5)


def test_checkpoint_round_trips_state_and_data_position(tmp_path):
    config = smoke(str(tmp_path / "a"), "train.steps=8", "train.checkpoint_every=4")
    train(config)
    manager = ckpt.make_manager(config.train.run_dir)
    assert manager.latest_step() == 8

    # Restore into a fresh iterator and state template: the data position must come back too.
    from mor_jax.model import build_model
    from mor_jax.training.mesh import logical_rules, make_mesh
    from mor_jax.training.state import abstract_state, make_optimizer, state_shardings

    tokenizer = make_tokenizer(config.data)
    train_docs, _ = load_documents(config.data)
    rows = pack_documents(train_docs, tokenizer, config.data.seq_len)
    model, optimizer = build_model(config.model), make_optimizer(config.train, config.model)
    mesh = make_mesh(config.mesh)
    shardings = state_shardings(config, model, optimizer, mesh, logical_rules(config.mesh))
    target = ckpt.abstract_target(abstract_state(config, model, optimizer), shardings)
    iterator = iter(make_train_dataset(config.data, rows))
    state = ckpt.restore(manager, 8, target, iterator)
    assert int(state.step) == 8

    reference = iter(make_train_dataset(config.data, rows))
    for _ in range(8):
        next(reference)
    np.testing.assert_array_equal(next(iterator)["tokens"], next(reference)["tokens"])

    # Save the restored state again and compare every leaf (params and optimizer moments).
    manager2 = ckpt.make_manager(str(tmp_path / "b"))
    ckpt.save(manager2, 8, state, iterator)
    manager2.wait_until_finished()
    again = ckpt.restore(manager2, 8, target)
    for left, right in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(again)):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))
    assert len(jax.tree_util.tree_leaves(state.opt_state)) > 0


def test_resume_continues_the_same_run(tmp_path):
    run_dir = str(tmp_path / "run")
    config = smoke(run_dir, "train.steps=12", "train.checkpoint_every=6", "train.log_every=1")
    straight = train(config)
    first_pass = read_metrics(run_dir)

    # Drop the final checkpoint: the rerun resumes from step 6 with its optimizer state and data position, and
    # must reproduce steps 7..12.
    import shutil

    shutil.rmtree(os.path.join(ckpt.checkpoint_dir(run_dir), "12"))
    resumed = train(config)
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        logged_steps = [json.loads(line)["step"] for line in handle if "train/loss" in line]
    assert logged_steps == list(range(1, 13)) + list(range(7, 13))
    second_pass = read_metrics(run_dir)
    for step in range(7, 13):
        assert second_pass[step] == pytest.approx(first_pass[step], rel=1e-6), f"step {step}"
    assert resumed["val_loss"] == pytest.approx(straight["val_loss"], rel=1e-6)


def test_resume_with_other_model_shape_is_rejected(trained_run, tmp_path):
    run_dir, _ = trained_run
    before = sorted(os.listdir(run_dir))
    with pytest.raises(ConfigError) as error:
        train(smoke(run_dir, "train.steps=70", "model.d_model=48"))
    assert "model.d_model: checkpoint=64 current=48" in str(error.value)
    assert sorted(os.listdir(run_dir)) == before
