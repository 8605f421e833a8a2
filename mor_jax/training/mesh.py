"""Device mesh and logical-axis shardings.

Parameters and activations are annotated with logical axis names; `MeshConfig.rules` maps each name to mesh axes
(`data`, `fsdp`, `tensor`). One device is a 1 x 1 x 1 mesh, so the same jitted step runs everywhere.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from mor_jax.config import ConfigError, MeshConfig

MESH_AXES = ("data", "fsdp", "tensor")


def mesh_shape(mesh_config: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """Resolve the -1 entry (if any) so that the axis sizes multiply to `device_count`."""
    sizes = [mesh_config.data, mesh_config.fsdp, mesh_config.tensor]
    known = int(np.prod([s for s in sizes if s != -1]))
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(
                f"mesh sizes {dict(zip(MESH_AXES, sizes))} do not divide the {device_count} available devices"
            )
        sizes[sizes.index(-1)] = device_count // known
    if int(np.prod(sizes)) != device_count:
        raise ConfigError(
            f"mesh sizes {dict(zip(MESH_AXES, sizes))} use {int(np.prod(sizes))} devices but {device_count} are "
            f"available; set one mesh size to -1 to infer it"
        )
    return tuple(sizes)


def make_mesh(mesh_config: MeshConfig, devices=None) -> Mesh:
    """Build the (data, fsdp, tensor) mesh over all devices (or the given ones)."""
    devices = list(devices) if devices is not None else jax.devices()
    shape = mesh_shape(mesh_config, len(devices))
    return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def logical_rules(mesh_config: MeshConfig) -> tuple:
    """Return the rules as Flax expects them: ((logical_name, mesh_axes or None), ...)."""
    rules = []
    for entry in mesh_config.rules:
        if not isinstance(entry, (list, tuple)) or len(entry) != 2:
            raise ConfigError(f"mesh.rules entry {entry!r} must be a pair [logical_name, mesh_axis]")
        name, target = entry
        targets = target if isinstance(target, (list, tuple)) else (target,)
        for axis in targets:
            if axis is not None and axis not in MESH_AXES:
                raise ConfigError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; valid: {MESH_AXES}")
        rules.append((name, tuple(target) if isinstance(target, (list, tuple)) else target))
    return tuple(rules)


def shardings_for(boxed_tree, mesh: Mesh, rules) -> object:
    """Map a tree of logically partitioned (boxed) values to a tree of NamedShardings of its unboxed form."""
    specs = nn.get_partition_spec(boxed_tree)
    return nn.logical_to_mesh_sharding(specs, mesh, rules)


# The config field that sets the size of each sharded logical axis, named in divisibility errors.
_AXIS_FIELDS = {"embed": "model.d_model", "heads": "model.num_heads", "kv_heads": "model.num_kv_heads",
                "mlp": "model.d_ff", "vocab": "model.vocab_size", "kv": "model.head_dim"}


def check_divisible(boxed_tree, mesh, rules) -> None:
    """Raise ConfigError if a sharded dimension's size is not a multiple of its mesh axes' total size.

    `mesh` may be a Mesh or an AbstractMesh. jit rejects such arrays with an error that names neither the parameter
    nor the config field to change, so this check runs before anything is compiled.
    """
    problems = {}  # (logical axis, size, mesh axes) -> paths of the leaves affected
    leaves = jax.tree_util.tree_leaves_with_path(boxed_tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))
    for path, leaf in leaves:
        if not isinstance(leaf, nn.Partitioned):
            continue
        shape = leaf.unbox().shape
        mesh_axes = nn.logical_to_mesh_axes(tuple(leaf.names), rules)
        for size, name, axes in zip(shape, leaf.names, mesh_axes):
            if axes is None:
                continue
            axes = axes if isinstance(axes, tuple) else (axes,)
            shards = int(np.prod([mesh.shape[axis] for axis in axes]))
            if size % shards:
                problems.setdefault((name, size, axes), []).append(jax.tree_util.keystr(path))
    if not problems:
        return
    lines = []
    for (name, size, axes), paths in problems.items():
        sizes = " x ".join(f"{axis}={mesh.shape[axis]}" for axis in axes)
        field = f" ({_AXIS_FIELDS[name]})" if name in _AXIS_FIELDS else ""
        lines.append(f"logical axis {name!r}{field} has size {size}, not a multiple of mesh {sizes} "
                     f"({len(paths)} arrays, e.g. {paths[0]})")
    raise ConfigError("the mesh cannot shard the train state evenly: " + "; ".join(lines) + ". Change those model "
                      "sizes or the mesh sizes, or map the logical axis to null in mesh.rules")


def batch_sharding(mesh: Mesh, rules) -> NamedSharding:
    """Sharding of a [batch, seq] token array: batch over the data-parallel axes, seq replicated."""
    spec = nn.logical_to_mesh_axes(("batch", "seq"), rules)
    return NamedSharding(mesh, PartitionSpec(*spec))


def data_parallel_size(mesh: Mesh, rules) -> int:
    """Number of shards the batch dimension is split into."""
    axes = batch_sharding(mesh, rules).spec[0]
    if axes is None:
        return 1
    axes = axes if isinstance(axes, tuple) else (axes,)
    return int(np.prod([mesh.shape[a] for a in axes]))
