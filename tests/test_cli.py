"""The command-line entry points: bad input gives one error line and a non-zero exit, never a traceback."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, cwd=ROOT):
    env = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def assert_one_line_error(result, *fragments):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    "overrides,fragments",
    [
        (["model.widht=64"], ["unknown config key model.widht"]),
        (["model.num_layers=6"], ["model.num_layers=6", "divisible by model.num_recursions=3"]),
        (["data.seq_len=-4"], ["data.seq_len=-4"]),
        (["data.source=files", "data.train_paths=[/nonexistent/corpus.txt]"], ["/nonexistent/corpus.txt"]),
    ],
)
def test_train_rejects_bad_input(tmp_path, overrides, fragments):
    run_dir = tmp_path / "run"
    result = run("train.py", "--config", "configs/smoke.yaml", f"train.run_dir={run_dir}", *overrides)
    assert_one_line_error(result, *fragments)
    assert not run_dir.exists()


def test_train_rejects_empty_corpus(tmp_path):
    corpus = tmp_path / "empty.txt"
    corpus.write_text("")
    result = run("train.py", "--config", "configs/smoke.yaml", f"train.run_dir={tmp_path / 'run'}",
                 "data.source=files", f"data.train_paths=[{corpus}]")
    assert_one_line_error(result, str(corpus), "empty")


def test_eval_rejects_missing_run_dir(tmp_path):
    result = run("eval.py", "--run_dir", str(tmp_path / "missing"))
    assert_one_line_error(result, "run directory not found")


def test_generate_rejects_missing_prompts(tmp_path):
    result = run("-m", "mor_jax.tools.generate", "--run_dir", str(tmp_path))
    assert_one_line_error(result, "no prompts")
    result = run("-m", "mor_jax.tools.generate", "--run_dir", str(tmp_path / "missing"), "--prompt", "a")
    assert_one_line_error(result, "run directory not found")


def test_train_then_eval_print_json(tmp_path):
    run_dir = tmp_path / "run"
    trained = run("train.py", "--config", "configs/smoke.yaml", f"train.run_dir={run_dir}", "train.steps=10")
    assert trained.returncode == 0, trained.stderr
    result = json.loads(trained.stdout.strip().splitlines()[-1])
    for key in ("step", "train_loss", "val_loss", "val_bits_per_byte", "tokens_per_second", "run_dir"):
        assert key in result
    evaluated = run("eval.py", "--run_dir", str(run_dir), "--max_batches", "2", "--max_new_tokens", "16")
    assert evaluated.returncode == 0, evaluated.stderr
    final = json.loads(evaluated.stdout.strip().splitlines()[-1])
    for key in ("val_loss", "val_bits_per_byte", "perplexity", "mean_depth", "kept_fraction_per_recursion"):
        assert key in final
    assert "--- sample ---" in evaluated.stdout
    generated = run("-m", "mor_jax.tools.generate", "--run_dir", str(run_dir), "--prompt", "ROMEO.", "--prompt",
                    "JULIET.", "--max_new_tokens", "8", "--temperature", "0", "--json")
    assert generated.returncode == 0, generated.stderr
    texts = json.loads(generated.stdout.strip().splitlines()[-1])["texts"]
    assert len(texts) == 2 and all(len(t.encode("utf-8", "surrogateescape")) <= 8 for t in texts)
