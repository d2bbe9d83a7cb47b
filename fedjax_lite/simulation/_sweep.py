"""`run_sweep`: the training loop of a sweep (`fl.templates.build_sweep`), writing one ordinary run
folder per run (config.json, metrics.csv, metrics.jsonl, checkpoints/, as `fedjax-lite train`).

Runs advance round by round in groups of at most `runs_per_program` (slices of the run axis, each
one call of the vectorized `next`); every run is checkpointed and resumed on its own files.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import ClientBatches
from fedjax_lite.simulation import _checkpoint, _driver, _ledger, _lock, _metrics_managers
from fedjax_lite.simulation import _training_loop as loop
from fedjax_lite.templates import Sweep

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
MEMORY_KEY = 'memory'


def default_metrics_managers(run_dir: str) -> list[_metrics_managers.MetricsManager]:
  """`metrics.csv` and `metrics.jsonl` in `run_dir`, as `fedjax-lite train` writes them."""
  return [
    _metrics_managers.CSVMetricsManager(os.path.join(run_dir, 'metrics.csv')),
    _metrics_managers.JSONLMetricsManager(os.path.join(run_dir, 'metrics.jsonl')),
  ]


def stack_client_batches(batches: Sequence[ClientBatches]) -> ClientBatches:
  """Per-run cohorts as one `ClientBatches` with a leading run axis `[runs, clients, steps,
  batch_size, ...]`; the step axis is padded (mask 0) to the longest, which changes nothing."""
  first = batches[0]
  for k, b in enumerate(batches):
    if not isinstance(b, ClientBatches):
      raise TypeError(f'per-run client data [{k}] must be a ClientBatches; got {type(b).__name__}')
    shape, expected = np.shape(b.mask), np.shape(first.mask)
    if (shape[0], shape[2]) != (expected[0], expected[2]) or (b.client_ids is None) != (
      first.client_ids is None
    ):
      raise ValueError(
        f'per-run client data [{k}] has mask {shape} (client_ids given: {b.client_ids is not None})'
        f'; run 0 has {expected} ({first.client_ids is not None}). The runs of one program need '
        'the same number of clients and batch size (their steps may differ)'
      )
  steps = max(np.shape(b.mask)[1] for b in batches)

  def pad(x):
    widths = [(0, 0), (0, steps - x.shape[1])] + [(0, 0)] * (x.ndim - 2)
    return jnp.pad(x, widths)

  padded = [b._replace(batch=jax.tree.map(pad, b.batch), mask=pad(b.mask)) for b in batches]
  return jax.tree.map(lambda *xs: jnp.stack(xs), *padded)


# The share of the free memory (the device's, or the host's on a CPU) a sweep program may plan
# to use.
MEMORY_HEADROOM = 0.8


def _free_device_bytes() -> int | None:
  """Free memory of the default device, or None where it reports none (CPUs)."""
  stats = jax.devices()[0].memory_stats() or {}
  if 'bytes_limit' not in stats:
    return None
  return int(stats['bytes_limit']) - int(stats.get('bytes_in_use', 0))


def _free_host_bytes() -> int | None:
  """The host memory a new allocation can take (Linux's MemAvailable, else the free pages), or
  None where the system reports neither."""
  try:
    with open('/proc/meminfo') as f:
      for line in f:
        if line.startswith('MemAvailable:'):
          return int(line.split()[1]) * 1024
  except (OSError, ValueError, IndexError):
    pass
  try:
    return os.sysconf('SC_AVPHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (AttributeError, OSError, ValueError):
    return None


def _free_memory_bytes() -> int | None:
  """The free memory a sweep program runs in: the default device's, or on a CPU (which reports
  none) the host's; None where neither is known."""
  free = _free_device_bytes()
  if free is None and jax.devices()[0].platform == 'cpu':
    free = _free_host_bytes()
  return free


def runs_that_fit(sweep: Sweep, client_batches: Any) -> int | None:
  """The most runs of `sweep` one program holds in `MEMORY_HEADROOM` of the free memory (the
  device's; on a CPU the host's available memory), or None where none is reported (no bound).

  Estimated from the program compiled for one run: per run, its state, its new state and
  metrics, and XLA's temporaries; the round's batches once (per run when they carry a run axis,
  estimated from the first run's cohort).
  """
  free = _free_memory_bytes()
  if free is None:
    return None
  if not isinstance(client_batches, ClientBatches):  # one cohort per run: the first one's
    client_batches = stack_client_batches(list(client_batches)[:1])
  one_run = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), jax.eval_shape(sweep.initialize)
  )
  client_states = ()
  if sweep.process.initial_client_state is not None:  # one run's cohort states, per run
    clients = np.shape(client_batches.mask)[-3]
    client_states = (
      jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((1, clients, *np.shape(x)), np.asarray(x).dtype),
        sweep.process.initial_client_state,
      ),
    )
  memory = sweep.next.lower(one_run, client_batches, *client_states).compile().memory_analysis()
  state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves((one_run, client_states)))
  shared = memory.argument_size_in_bytes - state_bytes
  per_run = state_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
  if np.ndim(client_batches.mask) == 4:  # one cohort per run
    per_run, shared = per_run + shared, 0
  return max(1, int((MEMORY_HEADROOM * free - shared) // per_run))


class _Run:
  """One run's folder: its `config.json`, checkpoint and metrics managers."""

  def __init__(
    self,
    run_dir: str,
    config: Mapping[str, Any],
    keep: int | None,
    managers_fn,
    resumable: Sequence[str],
  ):
    # Array values (hyperparameters as jnp scalars) become numbers or lists.
    self.config = json.loads(json.dumps(dict(config), default=lambda x: np.asarray(x).tolist()))
    path = os.path.join(run_dir, CONFIG_FILE)
    if os.path.exists(path):  # a run to resume: only the resumable settings may change
      with open(path) as f:
        saved = json.load(f)
      changed = sorted(
        k
        for k in {*saved, *self.config}
        if k not in resumable and saved.get(k) != self.config.get(k)
      )
      if changed:
        raise ValueError(
          f'{run_dir} holds a run with other settings ({", ".join(changed)}); nothing was '
          'changed. Tip: other run folders for other settings.'
        )
    self.dir = run_dir
    self.checkpoints = _checkpoint.FileCheckpointManager(
      os.path.join(run_dir, CHECKPOINT_DIR), keep=keep, metadata=self.config
    )
    self.managers = list(managers_fn(run_dir))

  def write_config(self) -> None:
    """Writes `config.json`, once the run is accepted (resumed or started)."""
    with open(os.path.join(self.dir, CONFIG_FILE), 'w') as f:
      json.dump(self.config, f, indent=1)


class _GroupRunner:
  """A `Runner` of runs `start:stop` of a sweep (see `_driver.drive`): their state stacked on a
  run axis, advanced by one call of `sweep.next` a round.

  Args:
    sweep: the sweep.
    start, stop: the group's runs.
    runs: every run's folder.
    ledgers: every run's records.
    total_rounds: the sweep's rounds (a checkpoint past them is an error).
    initial: `() -> every run's initial state`, stacked (computed once for all groups).
    cohorts: a stateful sweep's `_Cohorts`, or None.
    evaluate_group: `(group state, round_num) -> [(metrics, seconds)]`, or None (the ledgers
      evaluate run by run).
  """

  def __init__(self, sweep, start, stop, runs, ledgers, total_rounds, initial, cohorts, evaluate):
    self._sweep, self.start_run, self.stop_run = sweep, start, stop
    self._runs, self._ledgers = runs[start:stop], ledgers[start:stop]
    self._total_rounds, self._initial = total_rounds, initial
    self._cohorts, self._evaluate = cohorts, evaluate
    self._num_runs = len(ledgers)
    self._memory: dict[Any, float] = {}
    self.last_round = max(ledger.last_round for ledger in self._ledgers)
    self.state, self.round = None, 0

  def start(self) -> None:
    self._resume()
    if self.state is not None:
      for ledger in self._ledgers:
        ledger.resume_at(self.round)
    else:
      self.state = jax.tree.map(lambda x: x[self.start_run : self.stop_run], self._initial())
      evaluations = [None] * len(self._ledgers)
      if self._evaluate is not None:
        evaluations = self._evaluate(self.state, 0)
      for ledger, state, evaluation in zip(
        self._ledgers, self._sweep.unstack(self.state), evaluations, strict=True
      ):
        ledger.start(state, evaluation)
    for run in self._runs:
      run.write_config()

  def _resume(self) -> None:
    """Loads the group's latest round that every run of it has (none if one has none)."""
    latest = [run.checkpoints.latest_readable_round() for run in self._runs]
    if all(r is None for r in latest):
      return
    if None in latest:  # restarting the group would leave the others' later checkpoints behind
      missing = [run.dir for run, r in zip(self._runs, latest, strict=True) if r is None]
      raise ValueError(
        f'{", ".join(missing)} hold no checkpoint while the other runs of their group do; the '
        'group cannot resume together. Tip: move those run folders away and rerun them apart.'
      )
    common = min(latest)
    if common > self._total_rounds:
      raise ValueError(
        f'the latest checkpoint is of round {common}, past total_rounds={self._total_rounds}. '
        'Tip: raise total_rounds, or use fresh run folders.'
      )
    structure = jax.eval_shape(self._sweep.process.initialize)
    states = []
    for run in self._runs:
      try:
        states.append(run.checkpoints.load_checkpoint(structure, common))
      except FileNotFoundError:
        raise ValueError(
          f'{run.dir} no longer holds round {common}, the latest round every run of its group '
          'has; its runs cannot resume together. Tip: keep at least 2 checkpoints (keep=2).'
        ) from None
    self.state, self.round = self._sweep.stack(states), common

  def step(self, round_num: int, data: Any, data_seconds: float) -> list[dict[str, Any]]:
    sweep, size = self._sweep, self.stop_run - self.start_run
    shared = isinstance(data, ClientBatches)
    group_data = data if shared else stack_client_batches(data[self.start_run : self.stop_run])
    specs = tree_lib.tree_specs(group_data)
    key = (jax.tree.structure(specs), tuple(jax.tree.leaves(specs)))
    client_states = ()
    if self._cohorts is not None:
      client_states = (self._cohorts.get(self.start_run, self.stop_run),)
    if key not in self._memory:  # compiles `next` for these shapes; the call below reuses it
      self._memory[key] = sweep.temp_bytes_per_run(self.state, group_data, *client_states)
    start = time.perf_counter()
    previous = self.state
    self.state, metrics, *client_states = sweep.next(self.state, group_data, *client_states)
    jax.block_until_ready((self.state, metrics))
    train_seconds = (time.perf_counter() - start) / size
    self.round = round_num
    running = np.array([round_num <= ledger.last_round for ledger in self._ledgers])
    if not running.all():  # runs past their budget keep their state
      self.state = _keep_stopped(running, self.state, previous)
    live = [ledger for ledger in self._ledgers if round_num <= ledger.last_round]
    states = [None] * size
    if any(ledger.needs_state(round_num) for ledger in live):
      states = sweep.unstack(self.state)
    evaluations = [None] * size
    if self._evaluate is not None and any(ledger.evaluates(round_num) for ledger in live):
      evaluations = self._evaluate(self.state, round_num)
    timing = {'data_seconds': data_seconds / self._num_runs, 'train_seconds': train_seconds}
    extra = {f'{MEMORY_KEY}/temp_bytes_per_run': self._memory[key]}
    released = []
    for k, ledger, run_metrics, state, evaluation in zip(
      range(self.start_run, self.stop_run),
      self._ledgers,
      sweep.unstack(jax.device_get(metrics)),
      states,
      evaluations,
      strict=True,
    ):
      if round_num > ledger.last_round:
        continue
      if self._cohorts is not None:
        self._cohorts.put(k, jax.tree.map(lambda x, i=k - self.start_run: x[i], client_states[0]))
      released.append(ledger.end_round(round_num, run_metrics, state, timing, extra, evaluation))
      loop.warn_if_no_usable_client(released[-1], data if shared else data[k], round_num)
    return released

  def finish(self) -> None:
    for ledger in self._ledgers:
      ledger.finish()


def run_sweep(
  sweep: Sweep,
  training_selection_fn: Callable[[int], Any],
  total_rounds: int,
  run_dirs: Sequence[str | os.PathLike],
  *,
  configs: Sequence[Mapping[str, Any]] | None = None,
  runs_per_program: int | None = None,
  evaluation_fn: Callable[[Any, Any], Mapping[str, Any]] | None = None,
  evaluation_selection_fn: Callable[[int], Any] | None = None,
  rounds_per_evaluation: int = 1,
  rounds_per_checkpoint: int = 1,
  keep: int | None = 3,
  metrics_managers_fn: Callable[[str], Sequence[Any]] = default_metrics_managers,
  progress: bool = False,
  resumable: Sequence[str] = (),
  privacy_accountant: Any = None,
  epsilon_budget: float | None = None,
  client_state_stores: Sequence[Any] | None = None,
  cohort_ids_fn: Callable[[int], Any] | None = None,
  vectorized_evaluation: bool = False,
) -> list[Any]:
  """Runs every run of `sweep` for rounds 1..`total_rounds`, resuming from its checkpoints.

  `run_training_process` for K runs at once: run k writes `run_dirs[k]` (locked while it runs)
  as `fedjax-lite train` writes a run folder: `config.json` (`configs[k]`, default
  `{'seed', 'hparams'}` of the run), `metrics.csv` and `metrics.jsonl` (`metrics_managers_fn`),
  and `checkpoints/` (a `FileCheckpointManager` of the run's own state, `configs[k]` as its
  metadata), so each run can be evaluated, plotted or extended alone.

  Runs advance in groups of `runs_per_program` (default: as many as fit), each group one call of
  `sweep.next` per round; groups take turns within a round, so the data of round r is built
  once. A group resumes from the latest round all its runs have checkpointed (a sweep killed
  between two runs' saves resumes from the earlier round), and the metrics released after it
  are cleared, so a resumed sweep equals an uninterrupted one bitwise (same groups).

  Each run releases its flat process metrics, `evaluation/<key>` (evaluated run by run), and
  per run: `timing/train_seconds` (its group's `next` over the group's size; compilation is not
  included), `timing/data_seconds` (the round's data over the number of runs),
  `timing/evaluation_seconds`, `timing/round_seconds`, `timing/examples_per_second`,
  `memory/temp_bytes_per_run` (XLA's temporaries of its group's program over the group's size),
  and with a `privacy_accountant` `privacy/epsilon` (its ε after the round).

  With `epsilon_budget`, each run stops as `run_training_process` stops it: after the last round
  whose ε (its own accountant's) is within the budget, that round evaluated, checkpointed and
  kept as a finished run's last round. A run that stops before the others of its group no
  longer changes (its group's later rounds leave its state as it was and release nothing).

  Args:
    sweep: from `fl.templates.build_sweep`.
    training_selection_fn: `round_num -> ClientBatches` shared by every run (common random
      numbers), or `round_num -> sequence of K ClientBatches`, one cohort per run (their steps
      are padded to the longest of each group). The data of round r must depend only on r.
    total_rounds: the last round (>= 1).
    run_dirs: K folders, one per run, in the order of `sweep.runs`.
    configs: K JSON-serializable mappings, each run's settings.
    runs_per_program: the most runs one compiled call advances (>= 1); bounds memory.
      Default: as many as fit in `MEMORY_HEADROOM` of the free memory (`runs_that_fit`): the
      device's, or on a CPU the host's available memory; all of them where none is reported.
    evaluation_fn: `(run state, evaluation data) -> metrics mapping`, called for each run.
    evaluation_selection_fn: `round_num -> evaluation data`; required with `evaluation_fn`.
    rounds_per_evaluation: evaluate every this many rounds (and at the last round).
    rounds_per_checkpoint: save every this many rounds (and at the last round).
    keep: checkpoints kept per run (see `FileCheckpointManager`; resuming needs 2 or more).
    metrics_managers_fn: `run_dir -> metrics managers` of a run; closed at the end.
    progress: a progress bar over the sweep's rounds (only on a terminal; needs rich).
    resumable: the keys of `configs` that may differ from a run folder's saved `config.json`
      when it resumes (e.g. the number of rounds); any other difference is an error and the
      folder is left as it was.
    privacy_accountant: e.g. `fl.aggregators.PrivacyAccountant`, for every run, or a sequence
      of K (one per run, e.g. for runs of different noise multipliers); `epsilon(round_num)` is
      released every round as `privacy/epsilon`.
    epsilon_budget: stop each run before the first round whose ε would exceed it; needs
      `privacy_accountant`. A budget below one round's ε is a ValueError.
    client_state_stores: for a stateful sweep (`sweep.process.initial_client_state`, e.g.
      SCAFFOLD), K stores, one per run, each a run's as `run_training_process` keeps it
      (committed before each checkpoint of the run, rolled back to the round its group resumes
      from).
    cohort_ids_fn: with `client_state_stores`, `round_num -> ids` of the round's shared cohort,
      or a sequence of K id lists when each run has its own cohort, in the data's order.
    vectorized_evaluation: evaluate a group's runs in one compiled call
      (`sweep.over_runs(evaluation_fn)`, laid out as `sweep.next`), each run released with the
      call's seconds over the group's size; `evaluation_fn` must then be traceable (as
      `build_evaluation_fn`'s is). False: one call per run.

  Returns:
    The final state of each run, in the order of `sweep.runs`.
  """
  if not isinstance(sweep, Sweep):
    raise TypeError(f'sweep must be a fl.templates.Sweep (build_sweep); got {sweep!r}')
  num_runs = len(sweep.runs)
  loop.check_callable('training_selection_fn', training_selection_fn, 'round_num -> data')
  for name, value in [
    ('total_rounds', total_rounds),
    ('rounds_per_evaluation', rounds_per_evaluation),
    ('rounds_per_checkpoint', rounds_per_checkpoint),
    ('runs_per_program', num_runs if runs_per_program is None else runs_per_program),
  ]:
    loop.check_positive_int(name, value)
  run_dirs = [os.fspath(d) for d in run_dirs]
  if len(run_dirs) != num_runs or len(set(map(os.path.abspath, run_dirs))) != num_runs:
    raise ValueError(f'run_dirs must be {num_runs} distinct folders, one per run; got {run_dirs}')
  if configs is None:
    configs = [{'seed': int(run.seed), 'hparams': run.hparams} for run in sweep.runs]
  if len(configs) != num_runs:
    raise ValueError(f'configs must hold {num_runs} mappings, one per run; got {len(configs)}')
  if (evaluation_fn is None) != (evaluation_selection_fn is None):
    raise ValueError('evaluation_fn and evaluation_selection_fn go together')
  stores = _check_client_states(sweep, client_state_stores, cohort_ids_fn, num_runs)
  accountants = _accountants(privacy_accountant, num_runs)
  for k, accountant in enumerate(accountants):
    name = 'privacy_accountant' + (f'[{k}]' if len(set(map(id, accountants))) > 1 else '')
    loop.check_privacy(name, accountant, epsilon_budget)
  last_rounds = [total_rounds] * num_runs
  if epsilon_budget is not None:
    last_rounds = [
      loop.last_round_within_budget(accountant, epsilon_budget, total_rounds)
      for accountant in accountants
    ]
  size = runs_per_program
  if size is None:  # what fits in the device's (a CPU: the host's) memory
    size = runs_that_fit(sweep, training_selection_fn(1))
  size = size or num_runs
  with contextlib.ExitStack() as stack:
    for run_dir in run_dirs:
      stack.enter_context(_lock.RunFolderLock(run_dir))
    runs = [
      _Run(run_dir, config, keep, metrics_managers_fn, resumable)
      for run_dir, config in zip(run_dirs, configs, strict=True)
    ]
    for manager in (m for run in runs for m in run.managers):
      stack.callback(manager.close)
    evaluate = None
    if evaluation_fn is not None:
      evaluate = lambda state, r: _ledger.evaluate(evaluation_fn, evaluation_selection_fn, state, r)
    ledgers = [
      _ledger.RunLedger(
        last_round,
        checkpoint_manager=run.checkpoints,
        metrics_managers=run.managers,
        evaluate=evaluate,
        rounds_per_evaluation=rounds_per_evaluation,
        rounds_per_checkpoint=rounds_per_checkpoint,
        privacy_accountant=accountant,
        client_state_store=store,
        reserved=(MEMORY_KEY,),
      )
      for run, last_round, accountant, store in zip(
        runs, last_rounds, accountants, stores, strict=True
      )
    ]
    evaluate_group = None
    if vectorized_evaluation and evaluation_fn is not None:
      evaluate_group = _group_evaluation(sweep, evaluation_fn, evaluation_selection_fn)
    cohorts = None if cohort_ids_fn is None else _Cohorts(cohort_ids_fn, stores)
    initial = functools.cache(sweep.initialize)
    groups = [
      _GroupRunner(
        sweep,
        start,
        min(start + size, num_runs),
        runs,
        ledgers,
        total_rounds,
        initial,
        cohorts,
        evaluate_group,
      )
      for start in range(0, num_runs, size)
    ]
    check = getattr(sweep.process.next, 'check_client_data', None)  # e.g. labels vs classes

    def round_data(round_num):
      data = _round_data(training_selection_fn(round_num), num_runs, round_num)
      if check is not None:  # on the host: inside the sweep's program the data is traced
        for run_data in [data] if isinstance(data, ClientBatches) else data:
          check(run_data)
      if cohorts is not None:
        cohorts.start_round(round_num, data)
      return data

    _driver.drive(groups, round_data, progress)
    return [state for group in groups for state in sweep.unstack(group.state)]


def _check_client_states(sweep, stores, cohort_ids_fn, num_runs) -> list[Any]:
  """One client-state store per run of a stateful sweep (checked as `run_training_process`
  checks one), or K Nones for a sweep without client state."""
  if stores is None:
    loop.check_client_states(sweep.process, None, cohort_ids_fn)
    return [None] * num_runs
  if isinstance(stores, str | bytes) or not isinstance(stores, Sequence) or len(stores) != num_runs:
    raise ValueError(
      f'client_state_stores must be a sequence of {num_runs} stores, one per run; got {stores!r}'
    )
  for store in stores:
    loop.check_client_states(sweep.process, store, cohort_ids_fn)
  if len(set(map(id, stores))) != num_runs:
    raise ValueError('client_state_stores must be distinct: each run keeps its own client states')
  return list(stores)


class _Cohorts:
  """The client states of a stateful sweep's round: read from and written to each run's store
  for the ids of its cohort."""

  def __init__(self, cohort_ids_fn: Callable[[int], Any], stores: Sequence[Any]):
    self._ids_fn, self._stores = cohort_ids_fn, stores
    self._ids: list[list[Any]] = []

  def start_round(self, round_num: int, data: Any) -> None:
    """Reads and checks each run's cohort ids of `round_num` against the round's data."""
    ids = self._ids_fn(round_num)
    if isinstance(data, ClientBatches):
      self._ids = [loop.cohort_ids(lambda r: ids, round_num, data)] * len(self._stores)
      return
    if not isinstance(ids, Sequence) or len(ids) != len(self._stores):
      raise ValueError(
        f'cohort_ids_fn({round_num}) must give {len(self._stores)} id lists, one per run, when '
        'each run has its own cohort'
      )
    self._ids = [
      loop.cohort_ids(lambda r, k=k: ids[k], round_num, run_data) for k, run_data in enumerate(data)
    ]

  def get(self, start: int, stop: int) -> Any:
    """The cohort states of runs `start:stop`, leaves `[runs, clients, ...]`."""
    states = [self._stores[k].get(self._ids[k]) for k in range(start, stop)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def put(self, k: int, client_states: Any) -> None:
    self._stores[k].put(self._ids[k], client_states)


def _accountants(privacy_accountant: Any, num_runs: int) -> list[Any]:
  """One accountant (or None) per run from one for every run or a sequence of them."""
  if isinstance(privacy_accountant, Sequence) and not isinstance(privacy_accountant, str):
    if len(privacy_accountant) != num_runs:
      raise ValueError(
        f'privacy_accountant must be one accountant or {num_runs}, one per run; got a sequence '
        f'of {len(privacy_accountant)}'
      )
    return list(privacy_accountant)
  return [privacy_accountant] * num_runs


def _group_evaluation(sweep, evaluation_fn, evaluation_selection_fn):
  """`(group state, round_num) -> [(metrics, seconds)]` per run: one compiled evaluation of
  every run of the group, its seconds shared equally."""
  evaluate_runs = jax.jit(sweep.over_runs(evaluation_fn))

  def evaluate_group(state, round_num):
    start = time.perf_counter()
    metrics = evaluate_runs(state, evaluation_selection_fn(round_num))
    jax.block_until_ready(metrics)
    per_run = sweep.unstack(jax.device_get(metrics))
    if not isinstance(per_run[0], Mapping):
      raise TypeError(
        f'evaluation_fn must return a mapping of metrics; got {type(per_run[0]).__name__}'
      )
    seconds = (time.perf_counter() - start) / len(per_run)
    return [(dict(m), seconds) for m in per_run]

  return evaluate_group


def _keep_stopped(running: np.ndarray, new: Any, old: Any) -> Any:
  """`new` for the runs `running` (`[runs] bool`), `old` for the others (leaves `[runs, ...]`)."""

  def select(n, o):
    return jnp.where(running.reshape(-1, *[1] * (n.ndim - 1)), n, o)

  return jax.tree.map(select, new, old)


def _round_data(data: Any, num_runs: int, round_num: int) -> Any:
  if isinstance(data, ClientBatches):
    return data
  if not isinstance(data, Sequence) or len(data) != num_runs:
    raise TypeError(
      f'training_selection_fn({round_num}) must return a ClientBatches or a sequence of '
      f'{num_runs} (one per run); got {type(data).__name__}'
    )
  return data
