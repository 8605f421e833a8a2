"""Start JAX's distributed runtime for multi-process runs (Cloud TPU pod slices, several hosts, local tests).

`initialize(mesh_config)` must run before anything touches a JAX device. It calls `jax.distributed.initialize`:

- with explicit settings when the environment sets JAX_COORDINATOR_ADDRESS ("host:port" of process 0),
  JAX_NUM_PROCESSES and JAX_PROCESS_ID, whatever mesh.multi_process says (except "off");
- with JAX's cluster auto-detection (Cloud TPU pod slices, Slurm, Open MPI) when mesh.multi_process="cluster";
- never otherwise, so a single-process run needs no settings.
"""

from __future__ import annotations

import logging
import os

import jax

from mor_jax.config import ConfigError, MeshConfig

logger = logging.getLogger(__name__)

ENV_VARIABLES = ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")


def _explicit_settings() -> tuple[str, int, int] | None:
    """Read (coordinator address, process count, process id) from the environment, or None if unset."""
    values = {name: os.environ.get(name, "") for name in ENV_VARIABLES}
    if not any(values.values()):
        return None
    missing = [name for name, value in values.items() if not value]
    if missing:
        raise ConfigError(f"a multi-process run needs all of {', '.join(ENV_VARIABLES)}; missing: "
                          f"{', '.join(missing)}")
    try:
        count, index = int(values["JAX_NUM_PROCESSES"]), int(values["JAX_PROCESS_ID"])
    except ValueError:
        raise ConfigError(f"JAX_NUM_PROCESSES={values['JAX_NUM_PROCESSES']!r} and JAX_PROCESS_ID="
                          f"{values['JAX_PROCESS_ID']!r} must be integers") from None
    if count < 1 or not 0 <= index < count:
        raise ConfigError(f"JAX_PROCESS_ID={index} must be in [0, JAX_NUM_PROCESSES={count})")
    return values["JAX_COORDINATOR_ADDRESS"], count, index


def initialize(mesh_config: MeshConfig) -> bool:
    """Start jax.distributed when the environment or mesh.multi_process requests it, and return whether it started.

    Does nothing when it was already started in this process.
    """
    if mesh_config.multi_process == "off" or jax.distributed.is_initialized():
        return False
    settings = _explicit_settings()
    if settings is not None:
        address, count, index = settings
        logger.info("starting jax.distributed: process %d of %d, coordinator %s", index, count, address)
        jax.distributed.initialize(address, num_processes=count, process_id=index)
    elif mesh_config.multi_process == "cluster":
        logger.info("starting jax.distributed with cluster auto-detection")
        jax.distributed.initialize()
    else:
        return False
    logger.info("jax.distributed started: process %d of %d, %d local and %d global devices", jax.process_index(),
                jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
