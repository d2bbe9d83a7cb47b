"""Runs that span several processes on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it samples the same cohort, batches only its own block of
it, and the blocks form one global `ClientBatches` sharded over every device of every process
(`global_batches`). The round is the ordinary sharded round (`mesh=`): each device trains its
clients and one `psum` leaves the same server state on every process. Only the primary process
(`is_primary`) writes metrics and checkpoints; a resumed run restores on the primary and
broadcasts (`broadcast_from_primary`), so no shared file system is needed.

Launch (`docs/simulation.md` has the commands):
- several processes on one machine: `fedjax-lite train --processes N`;
- N machines: on each, `JAX_COORDINATOR_ADDRESS=host0:PORT FEDJAX_LITE_NUM_PROCESSES=N
  FEDJAX_LITE_PROCESS_ID=i fedjax-lite train --distributed ...`;
- SLURM: `srun fedjax-lite train --distributed ...` (JAX reads the cluster from SLURM).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lite.data import _client_batches

NUM_PROCESSES_ENV = 'FEDJAX_LITE_NUM_PROCESSES'
PROCESS_ID_ENV = 'FEDJAX_LITE_PROCESS_ID'
CORES_ENV = 'FEDJAX_LITE_CORES'  # the cores `launch` gives a process, pinned by `initialize`
CLIENTS_AXIS = 'clients'


def initialize(
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> None:
  """Joins this process to a multi-process run; call before anything else touches JAX.

  Arguments left None come from `JAX_COORDINATOR_ADDRESS`, `FEDJAX_LITE_NUM_PROCESSES` and
  `FEDJAX_LITE_PROCESS_ID`, or else from JAX's cluster detection (SLURM, Open MPI, ...). On
  CPUs the processes' collectives run over gloo.
  """
  if CORES_ENV in os.environ and hasattr(os, 'sched_setaffinity'):  # set by `launch`
    os.sched_setaffinity(0, [int(core) for core in os.environ[CORES_ENV].split(',')])
  if num_processes is None and NUM_PROCESSES_ENV in os.environ:
    num_processes = int(os.environ[NUM_PROCESSES_ENV])
  if process_id is None and PROCESS_ID_ENV in os.environ:
    process_id = int(os.environ[PROCESS_ID_ENV])
  jax.config.update('jax_cpu_collectives_implementation', 'gloo')
  jax.distributed.initialize(coordinator_address, num_processes, process_id)


def is_primary() -> bool:
  """Whether this process writes the run's outputs (process 0)."""
  return jax.process_index() == 0


def global_mesh() -> Mesh:
  """Every device of every process on one `'clients'` axis, in process order."""
  return Mesh(np.array(jax.devices()), (CLIENTS_AXIS,))


def cohort_block(cohort_size: int, mesh: Mesh) -> tuple[int, int, int]:
  """`(start, stop, padded_size)`: this process's positions `[start, stop)` of the cohort padded
  to `padded_size`, a multiple of the device count (positions past `cohort_size` are clients
  without data, which weigh nothing)."""
  num_devices = mesh.devices.size
  padded = -(-cohort_size // num_devices) * num_devices
  per_process = padded // jax.process_count()
  start = jax.process_index() * per_process
  return start, start + per_process, padded


def global_batches(
  local: _client_batches.ClientBatches, padded_size: int, mesh: Mesh
) -> _client_batches.ClientBatches:
  """One global `ClientBatches` `[padded_size, ...]` from every process's block (`local`,
  `[padded_size // processes, ...]`, the same step count on every process), sharded over the
  mesh's clients axis."""
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (padded_size, *x.shape[1:]))

  return jax.tree.map(to_global, local)


def pad_block(local: _client_batches.ClientBatches, size: int) -> _client_batches.ClientBatches:
  """`local` with clients without data appended up to `size` clients."""
  extra = size - local.mask.shape[0]
  if extra <= 0:
    return local
  return jax.tree.map(
    lambda x: np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]), local
  )


def to_host(tree: Any) -> Any:
  """`tree` as host numpy arrays; arrays replicated over processes give this process's copy."""

  def host(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      x = x.addressable_data(0)
    return np.asarray(x)

  return jax.tree.map(host, tree)


def broadcast_from_primary(tree: Any) -> Any:
  """The primary process's `tree` on every process (host arrays; same structure everywhere)."""
  if jax.process_count() == 1:
    return tree
  return multihost_utils.broadcast_one_to_all(to_host(tree))


def broadcast_json(value: Any) -> Any:
  """The primary process's JSON-serializable `value` on every process (others pass anything)."""
  if jax.process_count() == 1:
    return value
  data = np.frombuffer(json.dumps(value).encode(), np.uint8) if is_primary() else None
  size = int(broadcast_from_primary(np.int64(0 if data is None else data.size)))
  buffer = data if data is not None else np.zeros(size, np.uint8)
  return json.loads(bytes(np.asarray(broadcast_from_primary(buffer))))


class PrimaryCheckpointManager:
  """A `FileCheckpointManager` that only the primary process touches.

  Saving writes the primary's copy of the (replicated) state; the other processes write
  nothing. Restoring reads on the primary and broadcasts the state and its round, so every
  process resumes from the same round without a shared file system.
  """

  def __init__(self, manager: Any):
    self._manager = manager

  def save_checkpoint(self, state: Any, round_num: int, metadata: Any = None) -> None:
    if is_primary():
      self._manager.save_checkpoint(to_host(state), round_num, metadata)

  def load_latest_checkpoint(self, structure: Any) -> tuple[Any, int]:
    state, round_num = (None, 0)
    if is_primary():
      state, round_num = self._manager.load_latest_checkpoint(structure)
    found, round_num = broadcast_from_primary((np.int32(state is not None), np.int64(round_num)))
    if not found:
      return None, 0
    if state is None:  # another process: the structure's shapes, filled by the broadcast
      state = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), structure)
    return broadcast_from_primary(state), int(round_num)

  def checkpoint_rounds(self) -> list[int]:
    return self._manager.checkpoint_rounds() if is_primary() else []

  def mark_kept(self, round_num: int) -> None:
    if is_primary():
      self._manager.mark_kept(round_num)


def local_metrics(process: Any) -> Any:
  """`process` whose `next` returns its metrics as host arrays (this process's copy)."""

  def next_fn(state, *args, **kwargs):
    state, metrics = process.next(state, *args, **kwargs)
    return state, to_host(metrics)

  return process._replace(next=next_fn)


def launch(command: Sequence[str], num_processes: int) -> int:
  """Runs `command` as `num_processes` processes of one multi-process run on this machine.

  Each process gets the coordinator's address, its rank and its share of the cores in the
  environment (`initialize()` reads them and pins the process to its cores), with XLA's own
  threading off when the share is one core: clients are independent, so processes use the
  cores better than threads on small per-client matmuls. When a process fails, the others are
  stopped (they would wait in a collective for it).

  Returns:
    The first non-zero exit status, or 0.

  Raises:
    ValueError: more processes than cores.
  """
  cores = sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []
  if num_processes > max(len(cores), 1):
    raise ValueError(f'{num_processes} processes exceed the {len(cores)} cores available')
  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  workers = []
  for rank in range(num_processes):
    share = cores[rank::num_processes]
    env = {
      **os.environ,
      'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
      NUM_PROCESSES_ENV: str(num_processes),
      PROCESS_ID_ENV: str(rank),
    }
    if share:
      env[CORES_ENV] = ','.join(map(str, share))
    if len(share) == 1:
      env['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_cpu_multi_thread_eigen=false'
    # No preexec_fn: forking a multithreaded (JAX) parent to run Python can deadlock.
    workers.append(subprocess.Popen(list(command), env=env))
  try:
    while any(w.poll() is None for w in workers):
      if any(w.returncode for w in workers if w.returncode is not None):
        break
      time.sleep(0.05)
  finally:
    for worker in workers:
      if worker.poll() is None:
        worker.terminate()
        worker.wait()
  return next((w.returncode for w in workers if w.returncode), 0)
