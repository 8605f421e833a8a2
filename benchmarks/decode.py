"""Decoding throughput of MoR (expert-choice, N_r = 2, 3, 4) against vanilla with the serving engine.

    python -m benchmarks.decode [--json] [--train-steps 300] [--batch 32] [--memory-budget-mib 192]

Every model has 14 unrolled layers (vanilla: 14 distinct layers; MoR: prelude + a (12 / N_r)-layer block x N_r +
coda) of the README's default width, and is first trained on the embedded corpus (`--train-steps` steps of 8 x 256
bytes; reused from --run-root when a run with that many steps is there), so that its routers send realistic shares
of tokens to each depth. Then, in one process, each model serves 2 x batch requests: prompts of --prompt-len bytes
from the held-out works, generation lengths drawn uniformly from [mean / 2 ... 3 mean / 2] (EOS ignored), greedy.

Two batch sizes: --batch, and the largest batch whose engine state (KV caches included) plus parameters fits
--memory-budget-mib. The MoR engines size their depth-cache segments by the capacities times --cache-slack (tokens
beyond a full segment stop early; the count is reported). Each model is compiled first (a warm-up run), then the
timed runs of all models alternate over --repeats rounds so machine noise hits all alike; each figure is the median.

Printed per row: tokens per second, the ratio to vanilla at the same batch setting, the mean recursion depth of the
decoded tokens, block items per generated token, cache bytes per token of context against vanilla, and the paper's
throughput ratio. `--json` ends with one JSON line: a list of rows.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import jax
import numpy as np

from mor_jax.config import load_config
from mor_jax.data import load_documents, make_tokenizer
from mor_jax.evaluation import load_run
from mor_jax.inference.cache import paper_block_ratio, vanilla_bytes_per_token
from mor_jax.inference.engine import Engine, Request
from mor_jax.training import train
from mor_jax.training.checkpoint import scan_checkpoints

MODELS = {"vanilla": None, "mor_ec_nr2": 2, "mor_ec_nr3": 3, "mor_ec_nr4": 4}
PAPER = {"batch": {2: 1.23, 3: 1.33, 4: 1.42}, "max": {2: 1.60, 3: 1.95, 4: 2.06}}
NUM_LAYERS = 14


def trained_run(name: str, recursions, args):
    """Train (or reuse) one benchmark model; returns the loaded run."""
    run_dir = os.path.join(args.run_root, name)
    overrides = [f"train.run_dir={run_dir}", f"train.steps={args.train_steps}", f"model.num_layers={NUM_LAYERS}",
                 "data.seq_len=256", "data.batch_size=8", "train.eval_every=0", "train.final_eval_batches=4",
                 f"train.checkpoint_every={args.train_steps}", "train.warmup_steps=30"]
    if recursions is None:
        overrides.append("model.kind=vanilla")
    else:
        overrides += ["model.kind=mor", f"model.num_recursions={recursions}"]
    done = os.path.isdir(run_dir) and args.train_steps in scan_checkpoints(run_dir).complete
    if not done:
        config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.yaml"), overrides)
        result = train(config)
        bits = result.get('val_bits_per_byte', float('nan'))
        print(f"trained {name}: {args.train_steps} steps, held-out {bits:.3f} bits/byte")
    return load_run(run_dir, args.train_steps)


def make_requests(tokenizer, count: int, args, seed: int) -> list:
    """Prompts from the held-out works and generation lengths around args.mean_new."""
    config = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "default.yaml"))
    _, val_docs = load_documents(config.data)
    text = np.concatenate([tokenizer.encode(doc.text) for doc in val_docs])
    rng = np.random.default_rng(seed)
    requests = []
    for _ in range(count):
        start = int(rng.integers(0, len(text) - args.prompt_len))
        prompt = [int(t) for t in text[start:start + args.prompt_len]]
        new = int(rng.integers(args.mean_new // 2, 3 * args.mean_new // 2 + 1))
        requests.append(Request(prompt, new, stop_at_eos=False))
    return requests


def allowed_tokens(run) -> np.ndarray:
    allowed = np.zeros((run.config.model.vocab_size,), bool)
    allowed[: run.tokenizer.vocab_size] = True
    allowed[run.tokenizer.pad_id] = False
    return allowed


def engine_for(run, rows: int, args) -> Engine:
    cfg = run.config.model
    depth_cache = "full"
    if cfg.kind == "mor":
        depth_cache = [1.0] + [min(1.0, c * args.cache_slack) for c in cfg.capacity_fractions()[1:]]
    return Engine(cfg, run.variables, max_batch=rows, max_len=args.prompt_len + 3 * args.mean_new // 2,
                  allowed_tokens=allowed_tokens(run), depth_cache=depth_cache)


def params_bytes(run) -> int:
    return int(sum(a.size * a.dtype.itemsize for a in jax.tree_util.tree_leaves(run.params)))


def largest_batch(run, args) -> int:
    """Rows whose engine state plus parameters fit the memory budget (state bytes grow linearly with rows)."""
    one, two = (engine_for(run, rows, args).state_bytes for rows in (1, 2))
    per_row, fixed = two - one, 2 * one - two
    budget = args.memory_budget_mib * 2 ** 20 - params_bytes(run) - fixed
    return int(max(1, budget // per_row))


def timed_run(engine: Engine, requests) -> dict:
    before_items = int(engine.state.block_items)
    before_overflow = int(engine.state.overflow)
    started = time.perf_counter()
    completions = engine.run(requests)
    seconds = time.perf_counter() - started
    tokens = sum(len(c.tokens) for c in completions)
    depths = [d for c in completions for d in c.depths]
    return {"seconds": seconds, "tokens": tokens, "mean_depth": float(np.mean(depths)),
            "items": int(engine.state.block_items) - before_items,
            "overflow": int(engine.state.overflow) - before_overflow}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="end with one JSON line of all rows")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--run-root", default="runs/decode_bench")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--memory-budget-mib", type=float, default=192.0)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--mean-new", type=int, default=256)
    parser.add_argument("--cache-slack", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    runs = {name: trained_run(name, n, args) for name, n in MODELS.items()}
    tokenizer = make_tokenizer(runs["vanilla"].config.data)
    settings = {"batch": {name: args.batch for name in runs},
                "max": {name: largest_batch(run, args) for name, run in runs.items()}}
    rows = []
    for setting, batches in settings.items():
        engines, requests = {}, {}
        for name, run in runs.items():
            engines[name] = engine_for(run, batches[name], args)
            requests[name] = make_requests(tokenizer, 2 * batches[name], args, seed=1)
            warmup = [Request(r.prompt, 4, stop_at_eos=False) for r in requests[name][: batches[name]]]
            engines[name].run(warmup)  # compiles the prefill and the engine step
        samples = {name: [] for name in runs}
        for repeat in range(args.repeats):
            for name in runs:
                samples[name].append(timed_run(engines[name], requests[name]))
                sample = samples[name][-1]
                print(f"{setting} batch, round {repeat + 1}: {name} {sample['tokens'] / sample['seconds']:.1f} "
                      f"tokens/s", flush=True)
        speed = {name: statistics.median(s["tokens"] / s["seconds"] for s in samples[name]) for name in runs}
        for name, run in runs.items():
            cfg = run.config.model
            last = samples[name][-1]
            engine = engines[name]
            context = args.prompt_len + 3 * args.mean_new // 2
            cache_per_token = engine.state.cache.nbytes / (engine.max_batch * context)
            n = MODELS[name]
            rows.append({
                "model": name, "setting": setting, "batch": batches[name],
                "tokens_per_second": round(speed[name], 1),
                "ratio_to_vanilla": round(speed[name] / speed["vanilla"], 3),
                "paper_ratio": PAPER[setting].get(n),
                "mean_depth": round(last["mean_depth"], 3),
                "block_items_per_token": round(last["items"] / last["tokens"], 3),
                "cache_overflow_stops": last["overflow"],
                "cache_bytes_per_token_ratio": round(cache_per_token / vanilla_bytes_per_token(cfg), 3),
                "paper_block_cache_ratio": paper_block_ratio(cfg),
                "memory_mib": round((engine.state_bytes + params_bytes(run)) / 2 ** 20, 1),
                "params": int(sum(a.size for a in jax.tree_util.tree_leaves(run.params))),
            })
    header = ("model", "setting", "batch", "tokens_per_second", "ratio_to_vanilla", "paper_ratio", "mean_depth",
              "block_items_per_token", "cache_overflow_stops", "cache_bytes_per_token_ratio", "memory_mib")
    print(" | ".join(header))
    for row in rows:
        print(" | ".join(str(row[key]) for key in header))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
