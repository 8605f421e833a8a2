"""Train vanilla, MoR (expert- and token-choice), Mixture-of-Depths, D-LLM and Leap-of-Thought at one forward-FLOP
budget on the embedded corpus, and write the results table and a loss-vs-FLOPs plot.

    python -m benchmarks.compare_peers [--json] [--vanilla-steps 200] [--only vanilla mod ...]

Every model starts from configs/default.yaml (d_model 128, 8 unrolled layers, 16 rows of 128 bytes per step, the
same optimizer, data order and held-out split) and changes only its model section. The budget is --vanilla-steps
steps of the vanilla model, in forward FLOPs as `mor_jax.training.flops.forward_flops` counts them, and
`train.flop_budget` turns it into each model's step count, so a cheaper model trains on more batches. Runs go to a
temporary directory that is deleted afterwards.

Writes docs/peers.md (table, command, machine) and docs/peers_loss_vs_flops.png, or the paths given by --markdown and
--plot. With --json the last output line is one JSON object with every row.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import platform
import sys
import tempfile

import numpy as np

from mor_jax.cli import print_json_line, run_main
from mor_jax.config import Config, load_config
from mor_jax.training import train
from mor_jax.training.flops import forward_flops
from mor_jax.training.loop import apply_flop_budget

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE_CONFIG = os.path.join(ROOT, "configs", "default.yaml")

# Model overrides of each compared system on top of configs/default.yaml (an expert-choice MoR model).
SYSTEMS = {
    "vanilla": ["model.kind=vanilla"],
    "mor_expert": [],
    "mor_token": ["model.routing=token_choice", "model.gate_scale=null"],
    "mod": ["model.kind=mod", "model.mod_capacity=0.125", "model.mod_every=2"],
    "dllm": ["model.kind=dllm", "model.execution=masked", "model.target_execution_rate=0.5",
             "model.dllm_always_execute=4", "model.router_type=mlp", "model.router_mlp_dim=32"],
    "lot": ["model.kind=lot", "model.execution=masked", "model.target_execution_rate=0.5"],
}

LABELS = {
    "vanilla": "vanilla (8 layers)",
    "mor_expert": "MoR expert-choice, N_r = 3",
    "mor_token": "MoR token-choice, N_r = 3",
    "mod": "Mixture-of-Depths, 12.5% every other layer",
    "dllm": "D-LLM, target rate 0.5",
    "lot": "Leap-of-Thought, target rate 0.5",
}


def system_config(name: str, budget: float, run_dir: str) -> Config:
    """Config of one compared system at the shared forward-FLOP budget, with its warm-up at 10% of its steps."""
    overrides = SYSTEMS[name] + [
        f"train.run_dir={run_dir}", f"train.flop_budget={budget}", "train.eval_every=0", "train.final_eval_batches=0",
        "train.progress_bar=true", "train.log_every=10",
    ]
    config = apply_flop_budget(load_config(BASE_CONFIG, overrides))
    steps = config.train.steps
    return dataclasses.replace(config, train=dataclasses.replace(
        config.train, warmup_steps=max(1, steps // 10), checkpoint_every=steps, flop_budget=0.0,
    ))


def read_curve(run_dir: str) -> tuple[list[int], list[float]]:
    """(steps, training LM loss in nats per token) from a run's metrics.jsonl."""
    steps, losses = [], []
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if "train/lm_loss" in record:
                steps.append(record["step"])
                losses.append(record["train/lm_loss"])
    return steps, losses


def run_system(name: str, budget: float, root: str) -> dict:
    run_dir = os.path.join(root, name)
    config = system_config(name, budget, run_dir)
    per_step = forward_flops(config.model, config.data.seq_len) * config.data.batch_size
    result = train(config)
    steps, losses = read_curve(run_dir)
    kept = result["kept_fraction_per_recursion"]
    return {
        "system": name,
        "kind": config.model.kind,
        "steps": result["step"],
        "val_bits_per_byte": result["val_bits_per_byte"],
        "forward_flops": per_step * result["step"],
        "forward_flops_per_token": per_step / (config.data.batch_size * config.data.seq_len),
        "params": result["params"],
        "wall_seconds": result["wall_seconds"],
        "mean_depth": result["mean_depth"],
        "executed_fraction": float(np.mean(kept)) if kept else 1.0,
        "curve_flops": [per_step * s for s in steps],
        "curve_loss": losses,
    }


def write_plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    window = 5
    for row in rows:
        loss = np.asarray(row["curve_loss"])
        smoothed = np.convolve(loss, np.ones(window) / window, mode="valid") if len(loss) >= window else loss
        axes.plot(row["curve_flops"][len(loss) - len(smoothed):], smoothed, label=LABELS[row["system"]])
    axes.set_xlabel("forward FLOPs spent in training")
    axes.set_ylabel(f"training LM loss (nats per token, mean of {window} logs)")
    axes.set_ylim(top=min(3.5, axes.get_ylim()[1]))
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def markdown(rows: list[dict], command: str, plot_name: str) -> str:
    lines = [
        "# MoR and its peer systems at equal forward FLOPs",
        "",
        f"Produced by `{command}` on {datetime.date.today().isoformat()}, on {platform.machine()} with "
        f"{os.cpu_count()} CPU cores ({platform.processor() or 'processor not reported'}), Python "
        f"{platform.python_version()}. Every system starts from `configs/default.yaml`: d_model 128, 8 unrolled "
        "layers, batches of 16 x 128 bytes of the embedded Shakespeare, AdamW at 3e-3, warm-up over the first 10% "
        "of the steps and linear decay over the last 20%. Each system changes only the model section "
        "(`SYSTEMS` in `benchmarks/compare_peers.py`).",
        "",
        "| system | kind | steps | held-out bits per byte | forward FLOPs | FLOPs per token | params | "
        "executed fraction | mean depth | wall time (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {LABELS[row['system']]} | `{row['kind']}` | {row['steps']} | {row['val_bits_per_byte']:.4f} | "
            f"{row['forward_flops']:.3e} | {row['forward_flops_per_token']:.3e} | {row['params']:,} | "
            f"{row['executed_fraction']:.3f} | {row['mean_depth']:.2f} | {row['wall_seconds']:.0f} |"
        )
    lines += [
        "",
        "Columns:",
        "- steps: optimizer steps that the shared forward-FLOP budget buys the system (`train.flop_budget`).",
        "- held-out bits per byte: LM loss on the whole held-out split (two plays, 262,144 tokens), in bits per byte "
        "of text.",
        "- forward FLOPs: steps x forward FLOPs per batch, as `mor_jax.training.flops.forward_flops` counts them. "
        "For D-LLM and Leap-of-Thought this is what an implementation that skips work would compute at the target "
        "execution rate. The implementation here computes every token at every layer and selects the updates.",
        "- FLOPs per token: forward FLOPs of one token of a 128-byte row (logits included).",
        "- params: trainable parameters, routers and decision modules included.",
        "- executed fraction: held-out share of tokens that each recursion (MoR) or routed layer (Mixture-of-Depths) "
        "processes, or of (token, layer) pairs that execute (D-LLM, Leap-of-Thought), averaged; 1 for vanilla.",
        "- mean depth: held-out recursions (MoR) or layers (the others) per token.",
        "- wall time: the `train` call, compilation and the final held-out evaluation included. The two cores were "
        "shared with other work while these runs ran, so times are only comparable within one table.",
        "",
        "These are single runs (seed 0) of a few hundred steps on models of 0.8M to 1.7M parameters. Run-to-run "
        "variation was not measured, so small gaps between systems may not hold at other seeds or scales.",
        "",
        f"![training loss against forward FLOPs]({plot_name})",
        "",
        "The plot shows the training LM loss of every system against the forward FLOPs spent so far (a moving "
        "mean over 5 logged steps, one log per 10 steps). Method details: `mor_jax/model/mixture_of_depths.py`, "
        "`mor_jax/model/dllm.py`, `mor_jax/model/leap_of_thought.py`.",
        "",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.compare_peers", description=__doc__.split("\n\n")[0])
    parser.add_argument("--vanilla-steps", type=int, default=200,
                        help="forward-FLOP budget, in steps of the vanilla model (default 200)")
    parser.add_argument("--only", nargs="+", choices=sorted(SYSTEMS), default=list(SYSTEMS),
                        help="systems to train (default: all)")
    parser.add_argument("--markdown", default=os.path.join(ROOT, "docs", "peers.md"), help="table output path")
    parser.add_argument("--plot", default=os.path.join(ROOT, "docs", "peers_loss_vs_flops.png"),
                        help="plot output path")
    parser.add_argument("--json", action="store_true", help="print one JSON object with every row as the last line")
    args = parser.parse_args(argv)
    if args.vanilla_steps < 1:
        parser.error(f"--vanilla-steps={args.vanilla_steps} must be >= 1")

    vanilla = load_config(BASE_CONFIG, SYSTEMS["vanilla"])
    budget = float(args.vanilla_steps * forward_flops(vanilla.model, vanilla.data.seq_len) * vanilla.data.batch_size)
    rows = []
    with tempfile.TemporaryDirectory(prefix="compare_peers_") as root:
        for name in args.only:
            print(f"== {name}: {LABELS[name]}", file=sys.stderr, flush=True)
            rows.append(run_system(name, budget, root))
    command = "python -m benchmarks.compare_peers " + " ".join(argv or [])
    write_plot(rows, args.plot)
    with open(args.markdown, "w", encoding="utf-8") as handle:
        handle.write(markdown(rows, command.strip(), os.path.basename(args.plot)))
    for row in rows:
        print(f"{row['system']:>10}  steps {row['steps']:>5}  bits/byte {row['val_bits_per_byte']:.4f}  "
              f"FLOPs {row['forward_flops']:.3e}  params {row['params']:,}  {row['wall_seconds']:.0f} s")
    if args.json:
        print_json_line({"budget_forward_flops": budget,
                         "rows": [{k: v for k, v in row.items() if not k.startswith("curve")} for row in rows]})


if __name__ == "__main__":
    run_main(lambda: main(sys.argv[1:]))
