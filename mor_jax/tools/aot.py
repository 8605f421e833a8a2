"""Compile the real train step ahead of time for a Cloud TPU topology and report its memory and FLOPs per step.

    python -m mor_jax.tools.aot --config configs/paper/360m_mor_ec_nr3.yaml --topology v5e:4x4 [section.field=value ...]

Needs libtpu (`pip install "jax[tpu]"`), but no TPU: jax.experimental.topologies builds compile-only devices for
the topology, and XLA's TPU compiler lays the step out for them. The mesh comes from the config's mesh section over
the topology's chips. The last output line is one JSON object with topology, per_chip_bytes, hbm_bytes_per_chip,
fits, compiled_flops and analytic_flops.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

# Compile-only devices need no TPU metadata server; skip the query that libtpu would otherwise make.
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

import jax  # noqa: E402

from mor_jax.config import MorJaxError, load_config  # noqa: E402
from mor_jax.model import build_model  # noqa: E402
from mor_jax.training import checkpoint as ckpt  # noqa: E402
from mor_jax.training.flops import forward_flops  # noqa: E402
from mor_jax.training.mesh import batch_sharding, logical_rules, make_mesh  # noqa: E402
from mor_jax.training.state import abstract_state, learning_rate_schedule, make_optimizer, state_shardings  # noqa: E402
from mor_jax.training.steps import jit_train_step, make_train_step, skip_nonfinite_updates  # noqa: E402

logger = logging.getLogger(__name__)

# HBM per chip in bytes, by jax device_kind, from the Cloud TPU system-architecture pages (v4: 32 GiB,
# v5e: 16 GiB, v5p: 95 GiB, v6e: 32 GiB).
HBM_BYTES = {
    "TPU v4": 32 * 2**30,
    "TPU v5 lite": 16 * 2**30,
    "TPU v5e": 16 * 2**30,
    "TPU v5": 95 * 2**30,
    "TPU v5p": 95 * 2**30,
    "TPU v6 lite": 32 * 2**30,
}
PAD_ID = 257  # the byte tokenizer's PAD id; only masks the loss, so any id compiles the same step


class AotError(MorJaxError):
    """The topology is unknown or libtpu is missing."""


def topology_devices(name: str) -> list:
    """Compile-only devices of a TPU topology such as "v5e:4x4" or "v5p:4x4x4"."""
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(name, "tpu").devices)
    except (RuntimeError, ValueError) as error:
        raise AotError(f"cannot build TPU topology {name!r}: {error}. Install libtpu (pip install 'jax[tpu]') and "
                       f"use a name such as v5e:4x4 or v5p:4x4x4") from None


def hbm_bytes(device_kind: str) -> int | None:
    return HBM_BYTES.get(device_kind)


def compile_train_step(config, devices):
    """Lower and compile the jitted, sharded train step of `config` for `devices`; return (compiled, mesh)."""
    mesh = make_mesh(config.mesh, devices)
    rules = logical_rules(config.mesh)
    model = build_model(config.model)
    optimizer = make_optimizer(config.train, config.model)
    shardings = state_shardings(config, model, optimizer, mesh, rules)
    tokens_sharding = batch_sharding(mesh, rules)
    state = ckpt.abstract_target(abstract_state(config, model, optimizer), shardings)
    batch = jax.ShapeDtypeStruct((config.data.batch_size, config.data.seq_len + 1), jax.numpy.int32,
                                 sharding=tokens_sharding)
    step = make_train_step(model, optimizer, learning_rate_schedule(config.train), PAD_ID, config.train.microbatches)
    jitted = jit_train_step(skip_nonfinite_updates(step), shardings, tokens_sharding)
    with jax.set_mesh(mesh):
        compiled = jitted.lower(state, batch).compile()
    return compiled, mesh


def report(config, topology: str, compiled, mesh) -> dict:
    """Per-chip memory and per-step FLOPs of a compiled train step, next to the analytic FLOP count."""
    chips = mesh.devices.size
    memory = compiled.memory_analysis()
    # Donated state buffers are aliased to the outputs, so they are counted once.
    per_chip = (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
                + memory.temp_size_in_bytes + memory.generated_code_size_in_bytes)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    # The SPMD-partitioned module is one chip's program, so its FLOPs are per chip. XLA's cost analysis counts the
    # body of a loop once, so the micro-batch scan is counted for one micro-batch. Scaling by the micro-batch count
    # also multiplies the optimizer update, which is outside the loop, so the result slightly overestimates.
    raw_flops = float(cost.get("flops", 0.0)) * chips
    compiled_flops = raw_flops * config.train.microbatches
    analytic = 3 * forward_flops(config.model, config.data.seq_len) * config.data.batch_size
    kind = mesh.devices.flat[0].device_kind
    hbm = hbm_bytes(kind)
    return {
        "topology": topology,
        "device_kind": kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "batch_size": config.data.batch_size,
        "seq_len": config.data.seq_len,
        "remat": config.model.remat,
        "microbatches": config.train.microbatches,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "temp_bytes": memory.temp_size_in_bytes,
        "per_chip_bytes": per_chip,
        "hbm_bytes_per_chip": hbm,
        "fits": None if hbm is None else per_chip <= hbm,
        "compiled_flops": compiled_flops,
        "compiled_flops_one_loop_iteration": raw_flops,
        "analytic_flops": float(analytic),
        "compiled_to_analytic": compiled_flops / analytic if analytic else None,
    }


def print_report(result: dict) -> None:
    gib = 2**30
    hbm = result["hbm_bytes_per_chip"]
    print(f"{result['topology']}: {result['chips']} x {result['device_kind']}, mesh {result['mesh']}, "
          f"batch {result['batch_size']} x {result['seq_len']} tokens, remat {result['remat']}, "
          f"microbatches {result['microbatches']}")
    print(f"per chip: arguments {result['argument_bytes'] / gib:.2f} GiB, outputs {result['output_bytes'] / gib:.2f} "
          f"GiB (aliased {result['alias_bytes'] / gib:.2f}), temporaries {result['temp_bytes'] / gib:.2f} GiB, "
          f"total {result['per_chip_bytes'] / gib:.2f} GiB of "
          + (f"{hbm / gib:.0f} GiB HBM: {'fits' if result['fits'] else 'does NOT fit'}" if hbm else "unknown HBM"))
    scaled = ""
    if result["microbatches"] > 1:
        scaled = (f", i.e. {result['compiled_flops_one_loop_iteration']:.4g} for one micro-batch x "
                  f"{result['microbatches']}")
    print(f"FLOPs per step: compiled {result['compiled_flops']:.4g} (all chips{scaled}), analytic 3 x forward x "
          f"batch {result['analytic_flops']:.4g}, ratio {result['compiled_to_analytic']:.3f}")
    print(json.dumps({key: result[key] for key in ("topology", "per_chip_bytes", "hbm_bytes_per_chip", "fits",
                                                   "compiled_flops", "analytic_flops")}))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--topology", required=True, help="TPU topology, e.g. v5e:4x4 or v5p:4x4x4")
    parser.add_argument("overrides", nargs="*", help="section.field=value overrides, e.g. data.batch_size=256")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        config = load_config(args.config, args.overrides)
        devices = topology_devices(args.topology)
        compiled, mesh = compile_train_step(config, devices)
    except MorJaxError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except jax.errors.JaxRuntimeError as error:
        # XLA's TPU compiler rejects a program that cannot fit HBM; that is a result, not a crash.
        if "RESOURCE_EXHAUSTED" not in str(error):
            raise
        message = str(error).splitlines()[0]
        print(f"does NOT fit: {message}")
        print(json.dumps({"topology": args.topology, "per_chip_bytes": None,
                          "hbm_bytes_per_chip": hbm_bytes(devices[0].device_kind), "fits": False,
                          "compiled_flops": None, "analytic_flops": None, "compiler_error": message}))
        return 1
    print_report(report(config, args.topology, compiled, mesh))
    return 0


if __name__ == "__main__":
    sys.exit(main())
