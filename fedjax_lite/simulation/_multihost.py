"""Runs that span several processes on JAX's multi-controller runtime (`jax.distributed`).

Every process runs the same program: it samples the same cohort, batches only its own block of
it, and the blocks form one global `ClientBatches` sharded over every device of every process
(`global_batches`). The round is the ordinary sharded round (`mesh=`): each device trains its
clients and one `psum` leaves the same server state on every process. Only the primary process
(`is_primary`) writes metrics and checkpoints; a resumed run restores on the primary and
broadcasts (`broadcast_from_primary`), so no shared file system is needed. A stateful process's
client states (SCAFFOLD) stay in the primary's store too (`PrimaryClientStateStore`): each round
the primary reads the cohort's states and broadcasts them, and writes back the states the round
returns, gathered from every process.

Launch (`docs/simulation.md` has the commands):
- several processes on one machine: `fedjax-lite train --processes N`;
- N machines: on each, `JAX_COORDINATOR_ADDRESS=host0:PORT FEDJAX_LITE_NUM_PROCESSES=N
  FEDJAX_LITE_PROCESS_ID=i fedjax-lite train --distributed ...`;
- SLURM: `srun fedjax-lite train --distributed ...` (JAX reads the cluster from SLURM).
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from fedjax_lite.data import _client_batches
from fedjax_lite.simulation import _client_states

NUM_PROCESSES_ENV = 'FEDJAX_LITE_NUM_PROCESSES'
PROCESS_ID_ENV = 'FEDJAX_LITE_PROCESS_ID'
CORES_ENV = 'FEDJAX_LITE_CORES'  # the cores `launch` gives a process, pinned by `initialize`
# Set by `launch` for `initialize`: a pipe whose end means the launcher is gone, and the file
# that gets what the process's C/C++ code writes.
LAUNCHER_FD_ENV = 'FEDJAX_LITE_LAUNCHER_FD'
LOG_ENV = 'FEDJAX_LITE_LOG'
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

  What C and C++ code writes (gloo's connection banner, XLA's logs) goes to stderr, or to the
  process's log file under `launch`, so stdout carries only what Python prints. A process started
  by `launch` also ends as soon as the launcher does, however it ends (`SIGKILL` included).
  """
  _follow_launcher()
  _native_output_off_stdout(os.environ.pop(LOG_ENV, None))
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
  local: _client_batches.ClientBatches,
  padded_size: int,
  mesh: Mesh,
  cohort_ids: Sequence[Any] | None = None,
) -> _client_batches.ClientBatches:
  """One global `ClientBatches` `[padded_size, ...]` from every process's block (`local`,
  `[padded_size // processes, ...]`, the same step count on every process), sharded over the
  mesh's clients axis.

  With `cohort_ids` (the whole cohort's ids, the same on every process, e.g.
  `padded_cohort_ids`), `client_ids` is built from them and replicated instead, so every process
  can read the cohort's ids (`run_training_process` checks a stateful run's `cohort_ids_fn`
  against them); the values are the blocks' own.
  """
  sharding = NamedSharding(mesh, PartitionSpec(CLIENTS_AXIS))

  def to_global(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, (padded_size, *x.shape[1:]))

  batches = jax.tree.map(to_global, local)
  if cohort_ids is None or local.client_ids is None:
    return batches
  if len(cohort_ids) != padded_size:
    raise ValueError(f'cohort_ids has {len(cohort_ids)} ids; expected {padded_size}')
  low_bits = np.asarray(_client_states.client_keys(list(cohort_ids)), np.uint64).astype(np.uint32)
  return batches._replace(client_ids=replicated(low_bits, mesh))


def padded_cohort_ids(ids: Sequence[Any], mesh: Mesh) -> list[Any]:
  """`ids` followed by `0`s up to the padded cohort's size (`cohort_block`): the ids of a
  multi-process round's clients in the order of its `global_batches` (a padding client's data
  has `client_ids` 0). A `PrimaryClientStateStore` reads and writes only the first `len(ids)`."""
  padded = cohort_block(len(ids), mesh)[2]
  return [*ids, *[0] * (padded - len(ids))]


def pad_block(local: _client_batches.ClientBatches, size: int) -> _client_batches.ClientBatches:
  """`local` with clients without data appended up to `size` clients."""
  extra = size - local.mask.shape[0]
  if extra <= 0:
    return local
  return jax.tree.map(
    lambda x: np.concatenate([x, np.zeros((extra, *x.shape[1:]), x.dtype)]), local
  )


def replicated_sharding(mesh: Mesh | None = None) -> NamedSharding:
  """A whole copy on every device of `mesh` (default `global_mesh()`): where a sharded round
  (`mesh=`) returns the server state."""
  return NamedSharding(global_mesh() if mesh is None else mesh, PartitionSpec())


def replicated(tree: Any, mesh: Mesh | None = None) -> Any:
  """`tree` (host arrays, the same on every process) as global arrays on `replicated_sharding`."""
  sharding = replicated_sharding(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_process_local_data(sharding, x, x.shape)

  return jax.tree.map(put, tree)


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
  process resumes from the same round without a shared file system; the state is returned on
  `replicated_sharding()`, where the round keeps it (so the round compiles once).
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
    return replicated(broadcast_from_primary(state)), int(round_num)

  def checkpoint_rounds(self) -> list[int]:
    return self._manager.checkpoint_rounds() if is_primary() else []

  def mark_kept(self, round_num: int) -> None:
    if is_primary():
      self._manager.mark_kept(round_num)


_SHARED_ERRORS = {
  cls.__name__: cls for cls in (_client_states.ClientStateStoreError, ValueError, TypeError)
}


class PrimaryClientStateStore(_client_states.ClientStateStore):
  """The client states of a stateful process (SCAFFOLD's control variates) in a multi-process
  run: the primary process alone holds the store (its file), as `PrimaryCheckpointManager`
  holds the checkpoints; the others hold none and open no file.

  Every method is a collective: every process calls it, in the same order
  (`run_training_process` does).
  - `get(ids)`: the primary reads the cohort's states and broadcasts them; each process places
    its block on the mesh's clients axis as `global_batches` places the data, so the round gets
    them sharded like its clients (the same placement every round: it compiles once).
  - `put(ids, stacked)`: the states the round returns, sharded over the processes, are gathered
    (`process_allgather`), and the primary writes them.
  - `commit`, `rollback` and `len` run on the primary.
  An exception on the primary (`ClientStateStoreError`: a damaged file, or one out of step with
  the checkpoint; `ValueError`; ...) is raised on every process, the same type with the same
  message (another type as a `ClientStateStoreError` naming it), so the run stops as one
  instead of leaving the others waiting in their next collective.

  `ids` are a round's `num_clients` ids followed by its padding (`padded_cohort_ids`), one per
  client of the round's data: padding clients get `default` and are never stored.

  Args:
    open_store: `() -> ClientStateStore`, called on the primary only (e.g. opening the run's
      `SQLiteClientStateStore`); what it raises is raised on every process.
    default: the state of a client never seen (`process.initial_client_state`).
    num_clients: the clients of a round, before padding.
    mesh: the round's mesh (default `global_mesh()`).
  """

  def __init__(
    self,
    open_store: Any,
    default: Any,
    num_clients: int,
    mesh: Mesh | None = None,
  ):
    super().__init__(default)
    self._mesh = global_mesh() if mesh is None else mesh
    self._num_clients = num_clients
    self._start, self._stop, self._padded = cohort_block(num_clients, self._mesh)
    self._sharding = NamedSharding(self._mesh, PartitionSpec(CLIENTS_AXIS))
    self._store = self._on_primary(open_store)

  @property
  def store(self) -> _client_states.ClientStateStore | None:
    """The store itself on the primary process; None on the others."""
    return self._store

  def _on_primary(self, fn: Any, like: Any = None) -> Any:
    """`fn()` run on the primary; with `like` (its result's shapes, zeros) its result is
    broadcast to every process. Its exception is raised on every process."""
    result, error = None, None
    if is_primary():
      try:
        result = fn()
      except Exception as e:  # every process must hear of it, whatever it is
        error = e
    if jax.process_count() == 1:
      if error is not None:
        raise error
      return result
    payload = like if result is None or like is None else result
    failed, value = broadcast_from_primary((np.int32(error is not None), payload))
    if failed:
      kind, message = broadcast_json(None if error is None else [type(error).__name__, str(error)])
      if error is not None:
        raise error
      if kind in _SHARED_ERRORS:
        raise _SHARED_ERRORS[kind](message)
      raise _client_states.ClientStateStoreError(
        f'the client state store failed on process 0: {kind}: {message}'
      )
    return result if like is None else value

  def _cohort(self, ids: Sequence[Any]) -> list[Any]:
    """The round's clients of `ids` (without the padding), checked against the round's size."""
    ids = list(ids)
    if len(ids) != self._padded:
      raise ValueError(
        f'ids has {len(ids)} ids; a round of {self._num_clients} clients over {self._mesh.size} '
        f'devices has {self._padded} (fl.simulation.multihost.padded_cohort_ids)'
      )
    return ids[: self._num_clients]

  def get(self, ids: Sequence[Any]) -> Any:
    """The states of `ids`, global arrays `[len(ids), ...]` sharded over the mesh's clients axis
    (the padding clients' are `default`)."""
    cohort = self._cohort(ids)
    like = jax.tree.map(lambda d: np.zeros((len(cohort), *d.shape), d.dtype), self.default)
    stacked = self._on_primary(lambda: self._store.get(cohort), like)

    def place(x, default):
      padding = np.broadcast_to(default, (self._padded - len(cohort), *default.shape))
      x = np.concatenate([np.asarray(x, default.dtype), padding])
      block = x[self._start : self._stop]
      return jax.make_array_from_process_local_data(self._sharding, block, x.shape)

    return jax.tree.map(place, stacked, self.default)

  def put(self, ids: Sequence[Any], stacked: Any) -> None:
    """Writes `stacked` (leaves `[len(ids), ...]`, e.g. the round's returned client states,
    sharded over the processes) as the states of `ids` on the primary; padding is dropped."""
    cohort = self._cohort(ids)
    stacked = jax.tree.map(_gathered, stacked)
    self._on_primary(
      lambda: self._store.put(cohort, jax.tree.map(lambda x: x[: len(cohort)], stacked))
    )

  def commit(self, round_num, keep_rounds=()):
    keep = list(keep_rounds)  # the primary's checkpoint rounds (the others know none)
    self._on_primary(lambda: self._store.commit(round_num, keep))

  def rollback(self, round_num):
    self._on_primary(lambda: self._store.rollback(round_num))

  def __len__(self) -> int:
    return int(self._on_primary(lambda: np.int64(len(self._store)), np.int64(0)))

  def close(self) -> None:
    """Closes the primary's store (puts since its last commit are lost)."""
    close = getattr(self._store, 'close', None)
    if close is not None:
      close()


def _gathered(x: Any) -> np.ndarray:
  """`x` whole on this process's host: an array sharded over processes is all-gathered (every
  process must call this for it); other arrays are copied from this process's devices."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return to_host(x)


def local_metrics(process: Any) -> Any:
  """`process` for a multi-process driver: `next` returns its metrics as host arrays (this
  process's copy), and `initialize` returns the state on `replicated_sharding()`, where `next`
  returns it, so every round runs the program the first one compiled (an initial state on one
  device compiled the round again at round 2, seconds per process). A stateful process's `next`
  returns its client states as the round leaves them (sharded over the processes:
  `PrimaryClientStateStore.put` gathers them).
  """
  initialize = jax.jit(process.initialize, out_shardings=replicated_sharding())

  def next_fn(state, *args, **kwargs):
    state, metrics, *client_states = process.next(state, *args, **kwargs)
    return (state, to_host(metrics), *client_states)

  for name in ('tune', 'layout'):  # a measured layout (TunedNext): measured in every process
    if hasattr(process.next, name):
      setattr(next_fn, name, getattr(process.next, name))
  return process._replace(initialize=initialize, next=next_fn)


def launch(
  command: Sequence[str],
  num_processes: int,
  *,
  name: str = 'fedjax-lite',
  stop_timeout: float = 10.0,
) -> int:
  """Runs `command` as `num_processes` processes of one multi-process run on this machine.

  Each process gets the coordinator's address, its rank and its share of the cores in the
  environment (`initialize()` reads them and pins the process to its cores), with XLA's own
  threading off when the share is one core: clients are independent, so processes use the
  cores better than threads on small per-client matmuls.

  Stopping and failures:
  - `SIGINT` (Ctrl-C) or `SIGTERM` to this process is passed on as `SIGINT` to the processes
    (each in its own process group, so a terminal's Ctrl-C reaches them once, through here);
    those not gone after `stop_timeout` seconds are killed (a process whose peer already stopped
    waits in a collective). Then `KeyboardInterrupt` is raised here. Checkpoints are written
    atomically, so the latest one on disk is whole and a resumed run continues from it.
  - The processes end when this process ends, however it ends (`SIGKILL` included): each holds
    the read end of a pipe whose write end only this process holds (see `_follow_launcher`).
  - When a process fails (a non-zero status, or a signal) and the others do not end on their
    own within a second (they would wait in a collective for it), they are killed and one line
    on stderr names the failed process and its status.
  - What C/C++ code writes (gloo's banner, XLA's logs) goes to one log file per process, in a
    temporary folder kept (and named) only when a process fails. Process 0's stdout is this
    process's; its stderr reaches this process's stderr half a second late (`_Relay`), so what a
    process prints because another one just died stays in its log. The other processes' Python
    output (the same lines as process 0's) goes to their logs only.

  Args:
    command: the program every process runs; it calls `initialize()` first.
    num_processes: how many processes, at most one per core.
    name: the program name that starts the line naming a failed process.
    stop_timeout: seconds the processes get to stop after an interrupt before they are killed.

  Returns:
    0 when every process succeeds; else the failed process's exit status (128 + the signal's
    number when a signal ended it), or the first non-zero status when all ended on their own.

  Raises:
    ValueError: more processes than cores.
    KeyboardInterrupt: on `SIGINT` or `SIGTERM`, once the processes are gone.
  """
  cores = _cores()
  check_num_processes(num_processes)
  with socket.socket() as probe:  # a free port for the coordinator
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  log_dir = tempfile.mkdtemp(prefix='fedjax-lite-processes-')
  alive_read, alive_write = os.pipe()  # both ends are not inherited unless passed
  workers: list[subprocess.Popen] = []
  relay = None
  keep_logs = False
  restore_sigterm = _sigterm_raises_keyboard_interrupt()
  try:
    for rank in range(num_processes):
      log_path = os.path.join(log_dir, f'process-{rank}.log')
      share = cores[rank::num_processes]
      env = {
        **os.environ,
        'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
        NUM_PROCESSES_ENV: str(num_processes),
        PROCESS_ID_ENV: str(rank),
        LAUNCHER_FD_ENV: str(alive_read),
        LOG_ENV: log_path,
      }
      if share:
        env[CORES_ENV] = ','.join(map(str, share))
      if len(share) == 1:
        env['XLA_FLAGS'] = f'{os.environ.get("XLA_FLAGS", "")} --xla_cpu_multi_thread_eigen=false'
      with open(log_path, 'ab') as log:
        output = {'stderr': subprocess.PIPE} if rank == 0 else {'stdout': log, 'stderr': log}
        # No preexec_fn: forking a multithreaded (JAX) parent to run Python can deadlock;
        # `process_group` and `pass_fds` need none.
        worker = subprocess.Popen(
          list(command),
          env=env,
          stdin=subprocess.DEVNULL,
          pass_fds=(alive_read,),
          process_group=0,
          **output,
        )
      workers.append(worker)
      if rank == 0:
        relay = _Relay(worker.stderr, log_path)
    os.close(alive_read)
    alive_read = -1
    failed, stopped = _supervise(workers, relay)
    if failed is None:
      relay.close(forward=True)
      return 0
    rank, status = failed
    if status > 0 and not stopped:  # every process ended on its own: each said why
      relay.close(forward=True)
      return status
    relay.close(forward=rank == 0)  # process 0's own last words, or noise about the dead one
    keep_logs = True
    what = f'exited with status {status}'
    if status < 0:
      what = f'was killed by {_signal_name(-status)}'
    if stopped:
      what += f'; stopped process{"es" * (len(stopped) > 1)} {", ".join(map(str, stopped))}'
    print(
      f'{name}: error: process {rank} of {num_processes} {what} (logs: {log_dir})',
      file=sys.stderr,
      flush=True,
    )
    return status if status > 0 else 128 - status
  except KeyboardInterrupt:
    _stop(workers, stop_timeout)
    _kill(workers)
    if relay is not None:
      relay.close(forward=False)  # what the processes print as they stop says nothing new
    raise
  finally:
    _kill(workers)  # none left, unless something unexpected was raised
    for fd in (alive_read, alive_write):
      if fd >= 0:
        os.close(fd)
    restore_sigterm()
    if not keep_logs:
      shutil.rmtree(log_dir, ignore_errors=True)


def check_num_processes(num_processes: int) -> None:
  """Raises ValueError when `launch` would refuse `num_processes` (more than the cores)."""
  cores = _cores()
  if num_processes > max(len(cores), 1):
    raise ValueError(f'{num_processes} processes exceed the {len(cores)} cores available')


def _cores() -> list[int]:
  return sorted(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else []


_POLL_S = 0.05
_FAILED_GRACE_S = 1.0  # how long the others may take to end on their own after one fails


def _supervise(
  workers: list[subprocess.Popen], relay: _Relay
) -> tuple[tuple[int, int] | None, list[int]]:
  """Waits for the processes; returns the first failed `(rank, status)` (None if none failed)
  and the ranks killed because they were still running a second after it failed."""
  failed, failed_at = None, None
  while True:
    statuses = [w.poll() for w in workers]
    if failed is None:
      bad = [(rank, s) for rank, s in enumerate(statuses) if s]  # non-zero, or a signal (< 0)
      if bad:  # a signal first (its cause is outside the run), then the lowest rank
        failed, failed_at = min(bad, key=lambda b: (b[1] > 0, b[0])), time.monotonic()
      else:
        relay.forward()
    if all(s is not None for s in statuses):
      return failed, []
    if failed_at is not None and time.monotonic() - failed_at > _FAILED_GRACE_S:
      running = [rank for rank, worker in enumerate(workers) if worker.poll() is None]
      _kill(workers)
      return failed, running
    time.sleep(_POLL_S)


def _stop(workers: list[subprocess.Popen], timeout: float) -> None:
  """Passes an interrupt on to the processes and waits up to `timeout` seconds for them to end
  (the caller kills those left; a second interrupt stops the wait)."""
  try:
    for worker in workers:
      if worker.poll() is None:
        _signal_group(worker, signal.SIGINT)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(w.poll() is None for w in workers):
      time.sleep(_POLL_S)
  except KeyboardInterrupt:
    pass


def _kill(workers: list[subprocess.Popen]) -> None:
  """Kills the processes still running and waits for them."""
  for worker in workers:
    if worker.poll() is None:
      _signal_group(worker, signal.SIGKILL)
      worker.wait()


def _signal_name(signum: int) -> str:
  try:
    return signal.Signals(signum).name
  except ValueError:
    return f'signal {signum}'


def _signal_group(worker: subprocess.Popen, sig: int) -> None:
  """Sends `sig` to the process group `worker` leads (the worker and anything it started)."""
  with contextlib.suppress(ProcessLookupError):  # already gone
    os.killpg(worker.pid, sig)


def _sigterm_raises_keyboard_interrupt():
  """Makes SIGTERM raise `KeyboardInterrupt` here, so `launch` stops its processes; returns a
  function restoring the previous handler (nothing changes outside the main thread)."""
  if threading.current_thread() is not threading.main_thread():
    return lambda: None

  def handler(signum, frame):
    raise KeyboardInterrupt

  previous = signal.signal(signal.SIGTERM, handler)
  return lambda: signal.signal(signal.SIGTERM, previous)


class _Relay:
  """Copies process 0's stderr to its log file at once, and to this process's stderr
  `hold` seconds late: when a process dies, what the others print about it (a collective's
  traceback reaches process 0 within milliseconds, before the death is seen here) can still
  be withheld, and one line names the dead process instead."""

  def __init__(self, pipe: Any, log_path: str, hold: float = 0.5):
    self._pipe, self._hold = pipe, hold
    self._log = open(log_path, 'ab')  # noqa: SIM115 (closed by `close`, after the thread)
    self._lines: queue.SimpleQueue = queue.SimpleQueue()
    self._held: collections.deque = collections.deque()
    self._thread = threading.Thread(target=self._read, name='stderr-relay', daemon=True)
    self._thread.start()

  def _read(self) -> None:
    try:
      for line in iter(self._pipe.readline, b''):
        self._log.write(line)
        self._log.flush()
        self._lines.put((time.monotonic(), line))
    except (OSError, ValueError):  # the pipe or the log closed under us: nothing more to copy
      pass

  def _take(self) -> None:
    while True:
      try:
        self._held.append(self._lines.get_nowait())
      except queue.Empty:
        return

  def _write(self, line: bytes) -> None:
    sys.stderr.write(line.decode(errors='replace'))

  def forward(self) -> None:
    """Writes the lines read at least `hold` seconds ago."""
    self._take()
    now = time.monotonic()
    while self._held and now - self._held[0][0] >= self._hold:
      self._write(self._held.popleft()[1])
    sys.stderr.flush()

  def close(self, forward: bool) -> None:
    """Waits for the pipe's end (the process is gone), then writes the held lines if `forward`
    (else they are only in the log)."""
    self._thread.join(timeout=5)
    self._take()
    while forward and self._held:
      self._write(self._held.popleft()[1])
    self._held.clear()
    sys.stderr.flush()
    if not self._thread.is_alive():
      self._log.close()
      self._pipe.close()


def _follow_launcher() -> None:
  """In a process `launch` started: ends the process when the launcher is gone.

  The launcher passes the read end of a pipe whose write end only it holds, and never writes:
  a read returns end-of-file once the launcher has ended, however it ended (`SIGKILL`
  included). A pipe rather than Linux's `PR_SET_PDEATHSIG` (that fires when the *thread* that
  started the process ends, so a launcher on a worker thread would lose its processes early,
  and it is Linux only) or polling `os.getppid()` (a delay, and a pid a subreaper may hold).
  The waiting thread holds no lock while it waits; JAX releases the GIL while it computes.
  """
  fd = os.environ.pop(LAUNCHER_FD_ENV, None)
  if fd is None:
    return

  def exit_when_launcher_ends():
    try:
      while os.read(int(fd), 1):
        pass
    except OSError:
      pass
    os._exit(1)  # no clean-up: it could wait forever in a collective; checkpoints are atomic

  threading.Thread(target=exit_when_launcher_ends, name='launcher-watch', daemon=True).start()


def _native_output_off_stdout(log_path: str | None) -> None:
  """Points file descriptor 1 (and 2, given `log_path`) at `log_path` or else at stderr, while
  Python's `sys.stdout` (and `sys.stderr`) keep writing where they did: gloo's banner and XLA's
  logs, written by C++ straight to the descriptors, leave the user's stdout."""
  target = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644) if log_path else None
  sys.stdout = _on_own_descriptor(sys.stdout, 1)
  os.dup2(2 if target is None else target, 1)
  if target is not None:
    sys.stderr = _on_own_descriptor(sys.stderr, 2)
    os.dup2(target, 2)
    os.close(target)


def _on_own_descriptor(stream: Any, fd: int) -> Any:
  """`stream`, or a copy of it on a duplicate of `fd` when it writes to `fd` (so `fd` can be
  pointed elsewhere without moving it)."""
  try:
    if stream.fileno() != fd:
      return stream
  except (AttributeError, OSError, ValueError):  # None, or no descriptor (a notebook's stream)
    return stream
  stream.flush()
  return os.fdopen(os.dup(fd), 'w', buffering=1, encoding=stream.encoding, errors=stream.errors)
