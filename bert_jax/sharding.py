"""THE place that decides layouts: the device mesh, and how the batch, the parameters and the
optimizer state are laid out on it. No other module picks a sharding.

The mesh has two axes, in MaxText's vocabulary:
  data: data parallelism; each group of `fsdp` devices holds one full copy of the state.
  fsdp: fully-sharded data parallelism inside a group (ZeRO-3 style): every parameter and
        optimizer moment is split over the group; XLA gathers a parameter where it is used and
        reduce-scatters its gradient.
The batch is split over both axes (every device sees different rows). `fsdp=1` is plain
replicated data parallelism.

Parameter rule (big_vision's "fsdp" strategy): an array is split over `fsdp` along its largest
dimension that the fsdp width divides (ties: the last); it stays replicated when it is smaller
than MIN_SHARDED_SIZE elements, when no dimension divides, and along the stacked-layer axis of a
scanned encoder (`.../layers/...`, dimension 0), which the scan slices one layer at a time.
The same rule lays out optimizer moments (they have their parameter's shape) and the train state.
"""

from __future__ import annotations

import logging
import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from bert_jax.errors import ConfigError
from bert_jax.model import LAYERS  # a scanned encoder's stacked layers: encoder/layers/...

log = logging.getLogger(__name__)

DATA = "data"
FSDP = "fsdp"
BATCH_AXES = (DATA, FSDP)  # the batch dimension is split over every device
MIN_SHARDED_SIZE = 2**14  # smaller arrays (biases, LayerNorm) stay replicated

def _cluster_detected() -> bool:
  """Whether jax's own cluster detection (the one jax.distributed.initialize() runs without
  arguments) recognises this machine: a Cloud TPU VM slice (GCE or GKE, asked of the metadata
  server), SLURM, Open MPI, Kubernetes. The opt-in methods (mpi4py) are skipped, as jax does."""
  from jax._src import clusters  # private, but it is jax's detection itself
  return any(env.is_env_present() for env in clusters.ClusterEnv._cluster_types
             if not env.opt_in_only_method)


def _env_int(name: str) -> int:
  text = os.environ.get(name)
  try:
    return int(text)
  except (TypeError, ValueError):
    raise ConfigError(f"environment variable {name}={text!r}: expected a whole number (with "
                      "JAX_NUM_PROCESSES, set JAX_PROCESS_ID too)") from None


def init_distributed(coordinator: str | None = None, num_processes: int | None = None,
                     process_id: int | None = None) -> None:
  """Joins the processes of a multi-host run; a no-op for a single process outside a cluster.

  With explicit arguments (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID set)
  connects to that coordinator; on a Cloud TPU VM (also a single-host slice: the coordination
  service is what delivers preemption notices to the loop), SLURM, Open MPI or Kubernetes jax
  detects the cluster itself. Call it before anything else touches a jax backend.
  """
  if jax.distributed.is_initialized():
    return
  if coordinator is None and num_processes is None:
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    if os.environ.get("JAX_NUM_PROCESSES"):
      num_processes, process_id = _env_int("JAX_NUM_PROCESSES"), _env_int("JAX_PROCESS_ID")
    if coordinator is None and not _cluster_detected():
      return
  # Collectives between CPU processes (affects only the CPU client; asking which backend is the
  # default here would start it, and initialize() must come first).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(coordinator, num_processes, process_id)
  log.info("process %d of %d, %d local / %d global devices", jax.process_index(),
           jax.process_count(), jax.local_device_count(), jax.device_count())


def make_mesh(num_devices: int | None = None, fsdp: int = 1) -> Mesh:
  """A (data, fsdp) mesh over the first `num_devices` devices (default: all), `fsdp` devices
  per group. Consecutive devices (those of one host first) form an fsdp group."""
  devices = jax.devices()
  if num_devices:
    if num_devices > len(devices):
      raise ConfigError(f"train.num_devices={num_devices} but only {len(devices)} devices "
                        "exist")
    if jax.process_count() > 1 and num_devices != len(devices):
      # Every process feeds its share of each batch to devices of its own.
      raise ConfigError(f"train.num_devices={num_devices}: a run of {jax.process_count()} "
                        f"processes uses all {len(devices)} devices (set 0)")
    devices = devices[:num_devices]
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ConfigError(f"train.fsdp={fsdp} must be a positive divisor of the {n} devices")
  return Mesh(np.asarray(devices).reshape(n // fsdp, fsdp), (DATA, FSDP))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def _names(path) -> list[str]:
  return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def array_spec(path, shape: tuple[int, ...], fsdp: int) -> P:
  """The PartitionSpec of one parameter-shaped array under the rule of the module docstring."""
  if fsdp == 1 or int(np.prod(shape, dtype=np.int64)) < MIN_SHARDED_SIZE:
    return P()
  first = 1 if LAYERS in _names(path) else 0
  candidates = [i for i in range(first, len(shape)) if shape[i] % fsdp == 0]
  if not candidates:
    return P()
  axis = max(candidates, key=lambda i: (shape[i], i))
  return P(*([None] * axis + [FSDP]))


def state_shardings(mesh: Mesh, tree: Any) -> Any:
  """NamedShardings for a pytree of arrays or ShapeDtypeStructs (params, optimizer state, or a
  whole train state) on `mesh`."""
  fsdp = mesh.shape[FSDP]
  return jax.tree_util.tree_map_with_path(
      lambda path, x: NamedSharding(mesh, array_spec(path, tuple(x.shape), fsdp)), tree)


def with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings` (the targets of a restore or a compile)."""
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def put(tree: Any, shardings: Any) -> Any:
  """Host or device values -> arrays laid out by `shardings` (a pytree of them, or one)."""
  return jax.device_put(tree, shardings)


def bytes_per_device(tree: Any) -> int:
  """Bytes of `tree`'s live arrays held by the most loaded device (from addressable shards)."""
  per_device: dict[Any, int] = {}
  for x in jax.tree_util.tree_leaves(tree):
    for shard in x.addressable_shards:
      per_device[shard.device] = per_device.get(shard.device, 0) + shard.data.nbytes
  return max(per_device.values(), default=0)


def planned_bytes_per_device(abstract: Any, shardings: Any) -> int:
  """Bytes per device that `abstract` (ShapeDtypeStructs) would take under `shardings`,
  computed from the shard shapes without allocating anything."""
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(abstract), jax.tree_util.tree_leaves(shardings),
                  strict=True):
    total += int(np.prod(s.shard_shape(x.shape), dtype=np.int64)) * np.dtype(x.dtype).itemsize
  return total


def check_batch_size(name: str, global_batch_size: int, mesh: Mesh, grad_accum: int = 1
                     ) -> None:
  """Refuses a global batch that the devices of the mesh cannot split evenly, or whose
  `grad_accum` micro-batches they cannot."""
  n = mesh.devices.size
  if global_batch_size <= 0 or global_batch_size % n:
    raise ConfigError(f"{name}={global_batch_size} is not divisible by the {n} devices")
  if grad_accum < 1 or global_batch_size % grad_accum or (global_batch_size // grad_accum) % n:
    raise ConfigError(f"{name}={global_batch_size} / train.grad_accum={grad_accum} must be a "
                      f"whole number divisible by the {n} devices")


def local_rows(global_batch_size: int) -> slice:
  """The rows of a global batch that this process loads (processes own equal, contiguous
  slices in process order, as `global_batch` expects)."""
  per = global_batch_size // jax.process_count()
  return slice(jax.process_index() * per, (jax.process_index() + 1) * per)


def global_batch(local: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """This process's rows -> global arrays split over every device (no cross-host copy)."""
  sharding = batch_sharded(mesh)
  return jax.tree_util.tree_map(
      lambda x: jax.make_array_from_process_local_data(sharding, x), local)
