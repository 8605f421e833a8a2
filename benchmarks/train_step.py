"""Time the jitted training step and forward pass of MoR variants against vanilla at the same unrolled depth.

    python -m benchmarks.train_step [--json] [--repeats 7] [--recursions 2 3 4]

For N_r in --recursions, the models have L = 2 + 2 N_r unrolled layers (prelude, a 2-layer block x N_r, coda):
vanilla (L distinct layers), the router-free recursive model, MoR expert-choice on the masked and the gathered path,
and MoR token-choice on the gathered path. All of them are compiled first, then timed in one process, in a shuffled
interleaved order, after a warm-up call, so that machine noise hits every variant alike; each figure is the median
over --repeats calls.

Printed per row: the analytic forward-FLOP ratio to vanilla (`mor_jax.training.flops`; the masked path is charged
for every token it computes), the measured train-step and
forward time ratios to vanilla, the realised efficiency (time saving / FLOP saving), and XLA's memory estimate of the
compiled train step (arguments + temporaries).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mor_jax.config import ModelConfig, TrainConfig
from mor_jax.model import build_model, init_variables
from mor_jax.training.flops import forward_flops
from mor_jax.training.state import TrainState, learning_rate_schedule, make_optimizer
from mor_jax.training.steps import make_train_step

# Sized so that one vanilla train step takes about a second on a 2-core CPU.
BASE = ModelConfig(d_model=256, num_heads=4, num_kv_heads=2, head_dim=64, d_ff=768, vocab_size=384)
SEQ_LEN, BATCH = 256, 8

VARIANTS = {
    "vanilla": dict(kind="vanilla"),
    "recursive": dict(kind="recursive"),
    "mor_ec_masked": dict(kind="mor", routing="expert_choice", execution="masked"),
    "mor_ec_gathered": dict(kind="mor", routing="expert_choice", execution="gathered"),
    "mor_tc_gathered": dict(kind="mor", routing="token_choice", execution="gathered"),
}


def build_case(config: ModelConfig, batch):
    """Compile the train step and the forward pass; return callables that run one call each."""
    model = build_model(config)
    variables = nn.unbox(init_variables(model, jax.random.key(0)))
    params = variables.pop("params")
    train_config = TrainConfig(steps=1000, warmup_steps=10)
    optimizer = make_optimizer(train_config, config)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                       model_state=variables)
    step = jax.jit(make_train_step(model, optimizer, learning_rate_schedule(train_config), pad_id=257),
                   donate_argnums=(0,))
    compiled_step = step.lower(state, batch).compile()
    memory = compiled_step.memory_analysis()
    peak = None
    if memory is not None:
        peak = int(memory.argument_size_in_bytes + memory.temp_size_in_bytes + memory.output_size_in_bytes)
    forward = jax.jit(lambda p, s, t: model.apply({"params": p, **s}, t)[0])
    compiled_forward = forward.lower(params, variables, batch[:, :-1]).compile()
    holder = {"state": state}

    def run_step():
        holder["state"], metrics = compiled_step(holder["state"], batch)
        jax.block_until_ready(metrics["loss"])

    def run_forward():
        jax.block_until_ready(compiled_forward(holder["state"].params, holder["state"].model_state, batch[:, :-1]))

    return run_step, run_forward, peak


def measure(recursions: list[int], repeats: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    batch = jnp.asarray(rng.integers(0, 256, (BATCH, SEQ_LEN + 1)), jnp.int32)
    cases = {}
    for n in recursions:
        for name, changes in VARIANTS.items():
            config = dataclasses.replace(BASE, num_layers=2 + 2 * n, num_recursions=n, **changes)
            print(f"compiling {name} N_r={n}", flush=True)
            run_step, run_forward, peak = build_case(config, batch)
            run_step()
            run_forward()  # warm-up
            cases[(name, n)] = dict(config=config, step=run_step, forward=run_forward, peak=peak,
                                    step_times=[], forward_times=[])
    order = list(cases)
    for repeat in range(repeats):
        random.Random(seed + repeat).shuffle(order)
        for key in order:
            for kind in ("step", "forward"):
                start = time.perf_counter()
                cases[key][kind]()
                cases[key][f"{kind}_times"].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}/{repeats} done", flush=True)

    rows = []
    for (name, n), case in cases.items():
        vanilla = cases[("vanilla", n)]
        # The masked path computes every token at every recursion, so it is charged the full count.
        flops = forward_flops(case["config"], SEQ_LEN, gathered=case["config"].execution == "gathered")
        flops_ratio = flops / forward_flops(vanilla["config"], SEQ_LEN)
        step_time = statistics.median(case["step_times"])
        forward_time = statistics.median(case["forward_times"])
        time_ratio = step_time / statistics.median(vanilla["step_times"])
        forward_ratio = forward_time / statistics.median(vanilla["forward_times"])
        saving = 1.0 - flops_ratio
        rows.append({
            "variant": name,
            "recursions": n,
            "flops_ratio": flops_ratio,
            "time_ratio": time_ratio,
            "forward_time_ratio": forward_ratio,
            "efficiency": (1.0 - time_ratio) / saving if saving > 1e-9 else None,
            "step_seconds": step_time,
            "forward_seconds": forward_time,
            "train_step_memory_bytes": case["peak"],
        })
    return rows


def format_table(rows: list[dict]) -> str:
    header = (f"{'variant':<17}{'N_r':>4}{'FLOPs/van':>11}{'step/van':>10}{'fwd/van':>9}{'efficiency':>12}"
              f"{'step s':>9}{'memory MB':>11}")
    lines = [header, "-" * len(header)]
    for row in rows:
        efficiency = "n/a" if row["efficiency"] is None else f"{row['efficiency']:.2f}"
        memory = "n/a" if row["train_step_memory_bytes"] is None else f"{row['train_step_memory_bytes'] / 2**20:.0f}"
        lines.append(f"{row['variant']:<17}{row['recursions']:>4}{row['flops_ratio']:>11.3f}{row['time_ratio']:>10.3f}"
                     f"{row['forward_time_ratio']:>9.3f}{efficiency:>12}{row['step_seconds']:>9.3f}{memory:>11}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7, help="timed calls per variant (median reported)")
    parser.add_argument("--recursions", type=int, nargs="+", default=[2, 3, 4], help="values of N_r")
    parser.add_argument("--json", action="store_true", help="end with one JSON line holding the rows")
    args = parser.parse_args()
    print(f"{jax.devices()[0].device_kind}, d_model {BASE.d_model}, seq {SEQ_LEN}, batch {BATCH}", flush=True)
    rows = measure(args.recursions, args.repeats)
    print(format_table(rows))
    if args.json:
        print(json.dumps(rows))


if __name__ == "__main__":
    main()
