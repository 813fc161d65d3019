"""Data parallelism: one mesh over every device of every process.

Every training loop runs through `loop.run_loop`, which puts each batch on
the mesh split along its leading axis (`shard_batch`) and the state
replicated (`place_like`); jit then partitions the step (XLA's SPMD
partitioner inserts the all-reduces of the batch means), so one step
function serves one device, many devices and many hosts. A leaf whose
leading axis does not divide by the device count (a tiny set, a scalar) is
replicated instead: correct, only not split.

KRR-ST's synthetic set is replicated too, or, when it is large, split along
n (`shard_leading`): its features are then gathered by the partitioner for
K_ss (dual form) or reduced for the p x p Gram matrix (primal form).

Across hosts, `initialize` starts `jax.distributed` from the `parallel`
config section or the environment (JAX_COORDINATOR_ADDRESS,
JAX_NUM_PROCESSES, JAX_PROCESS_ID), before anything touches a device. Each
process then reads only the rows of each batch that live on its devices
(`make_array_from_callback`), and `to_host` gathers results for writing,
which only process 0 does.
"""

from __future__ import annotations

import functools
import os

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

AXIS = "data"


def initialize(coordinator_address: str = "", num_processes: int = 0,
               process_id: int = -1) -> bool:
  """Starts multi-process JAX when a coordinator is given (arguments or environment).

  Args:
    coordinator_address: "host:port" of process 0; "" = $JAX_COORDINATOR_ADDRESS.
    num_processes: 0 = $JAX_NUM_PROCESSES. process_id: -1 = $JAX_PROCESS_ID.

  Returns:
    True when `jax.distributed` was initialised (False: one process).
  """
  address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  if not address:
    return False
  num = num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
  pid = process_id if process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
  if num < 1 or pid < 0:
    raise ValueError(f"multi-process run at {address}: the process count ({num}) and this "
                     f"process's id ({pid}) are needed too (parallel.num_processes and "
                     f"parallel.process_id, or JAX_NUM_PROCESSES and JAX_PROCESS_ID)")
  # CPU devices of different processes talk through gloo (no effect on GPUs;
  # asking for the backend here would start it too early).
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(address, num_processes=num, process_id=pid)
  return True


@functools.lru_cache(maxsize=None)
def mesh() -> Mesh:
  """The one-axis mesh over all devices of all processes (axis "data")."""
  return Mesh(np.asarray(jax.devices()), (AXIS,))


def is_parallel() -> bool:
  return jax.device_count() > 1


def is_main_process() -> bool:
  """Process 0 writes files and prints progress."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (no-op with one process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # only multi-host runs need it
    multihost_utils.sync_global_devices(name)


def _sharding(value, split: bool) -> NamedSharding:
  m = mesh()
  split = split and np.ndim(value) > 0 and np.shape(value)[0] % m.size == 0
  return NamedSharding(m, PartitionSpec(AXIS) if split else PartitionSpec())


def _put(value, sharding: NamedSharding):
  if value is None:
    return None
  if isinstance(value, jax.Array) and value.sharding == sharding:
    return value
  host = np.asarray(value)
  # Only the slices on this process's devices are read (the multi-host case).
  return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def shard_batch(batch):
  """A pytree of arrays with a common leading (batch) axis, split over the mesh.

  No-op on one device. A leaf whose leading axis does not divide by the
  device count is replicated.
  """
  if not is_parallel():
    return batch
  return jax.tree.map(lambda a: _put(a, _sharding(a, split=True)), batch)


def shard_leading(tree):
  """Every leaf split along its leading axis (e.g. a large synthetic set along n)."""
  return shard_batch(tree)


def place_like(tree, reference):
  """`tree` on the mesh as `reference` is: leaves of `reference` already on the
  mesh give their sharding (e.g. a restored checkpoint takes the placement of
  the state it restores), all others are replicated. No-op on one device.
  """
  if not is_parallel():
    return tree
  def place(a, ref):
    on_mesh = (isinstance(ref, jax.Array) and isinstance(ref.sharding, NamedSharding)
               and ref.sharding.mesh == mesh())
    return _put(a, ref.sharding if on_mesh else _sharding(a, split=False))
  return jax.tree.map(place, tree, reference)


def to_host(tree):
  """A pytree of (possibly multi-host) arrays as numpy arrays, on every process."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # only multi-host runs need it

  def fetch(a):
    if not isinstance(a, jax.Array) or a.is_fully_addressable:
      return np.asarray(a)
    if a.sharding.is_fully_replicated:
      return np.asarray(a.addressable_data(0))
    return np.asarray(multihost_utils.process_allgather(a, tiled=True))

  return jax.tree.map(fetch, tree)
