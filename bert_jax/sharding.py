"""Devices, meshes and global batches: one `data` axis over every device of every process."""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

log = logging.getLogger(__name__)

DATA = "data"

# Environment variables that mean "this process is one of several": jax.distributed reads them.
_CLUSTER_ENV = ("JAX_COORDINATOR_ADDRESS", "COORDINATOR_ADDRESS", "SLURM_JOB_ID",
                "TPU_WORKER_HOSTNAMES", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins the processes of a multi-host run (no-op for a single process).

  With explicit arguments (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set)
  connects to that coordinator; on TPU pods, SLURM and Open MPI, jax detects the cluster itself.
  """
  if coordinator is None and num_processes is None:
    if not any(os.environ.get(k) for k in _CLUSTER_ENV):
      return
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if os.environ.get("JAX_NUM_PROCESSES"):
      num_processes = int(os.environ["JAX_NUM_PROCESSES"])
      process_id = int(os.environ["JAX_PROCESS_ID"])
  # Collectives between CPU processes (affects only the CPU client; asking which backend is the
  # default here would start it, and initialize() must come first).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh named `data` over the first `num_devices` devices (default: all)."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ValueError(f"asked for {num_devices} devices but only {len(devices)} exist")
    devices = devices[:num_devices]
  return Mesh(np.asarray(devices), (DATA,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over `data`."""
  return NamedSharding(mesh, P(DATA))


def local_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of the global batch that this process loads; refuses sizes that do not divide."""
  n = mesh.devices.size
  if global_batch_size % n:
    raise ValueError(f"global batch size {global_batch_size} is not divisible by the "
                     f"{n} devices of the mesh")
  return global_batch_size // jax.process_count()


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays sharded on `data` (no cross-host copy)."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)


def put_replicated(tree: Any, mesh: Mesh) -> Any:
  """Host values -> arrays replicated on every device of the mesh."""
  return jax.device_put(tree, replicated(mesh))
