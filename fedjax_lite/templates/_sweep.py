"""`build_sweep`: K runs of one learning process, differing in hyperparameters and seeds, as one
vectorized program (their states stacked on a leading run axis)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.templates import _processes


class SweepRun(NamedTuple):
  """One run of a sweep.

  Attributes:
    seed: handed to `process_fn(seed)`: the run's initial weights and keys.
    hparams: the hyperparameters this run sets, a (partial) mapping as
      `LearningProcess.set_hparams` takes, e.g. `{'client_work': {'learning_rate': 0.1}}`;
      `{}` keeps those the process was built with.
  """

  seed: int = 0
  hparams: Mapping[str, Any] = {}


class Sweep(NamedTuple):
  """Runs of one process advancing together; built by `build_sweep`.

  A sweep state is a run's state with every leaf stacked on a leading run axis `[runs, ...]`.
  `next` takes the state of any number of runs (all of them, or a group: a slice of the axis).

  Attributes:
    runs: the `SweepRun`s, in the order of the run axis.
    process: the `LearningProcess` of `runs[0]`'s seed; its `next` is the one vectorized.
    initialize: `() -> state` of every run, leaves `[K, ...]`.
    next: `(state, client_batches) -> LearningProcessOutput(state, metrics)`, one `jax.jit` of
      `process.next` over the run axis (see `build_sweep`'s lanes); state and metrics leaves
      `[runs, ...]`. `client_batches` is shared by the runs (leaves `[clients, ...]`: the same
      cohort, common random numbers) or one cohort per run (leaves `[runs, clients, ...]`).
      For a stateful process (`process.initial_client_state`, e.g. SCAFFOLD), `next(state,
      client_batches, client_states)` takes and returns (`StatefulLearningProcessOutput`) each
      run's cohort states, leaves `[runs, clients, ...]`.
    runs_per_lane: the runs vectorized together (None: all); the groups run in sequence.
  """

  runs: tuple[SweepRun, ...]
  process: _processes.LearningProcess
  initialize: Callable[[], Any]
  next: Callable[[Any, Any], _processes.LearningProcessOutput]
  runs_per_lane: int | None = None

  def over_runs(self, fn: Callable[..., Any]) -> Callable[..., Any]:
    """`fn(run_state, *shared) -> out` as `(state [runs, ...], *shared) -> out [runs, ...]`,
    laid out as `next` is (`runs_per_lane`): e.g. one evaluation call for every run of a group.
    `fn` must be traceable; wrap the result in `jax.jit` to compile it once."""

    def mapped(state, *shared):
      return _map_runs(lambda run_state: fn(run_state, *shared), state, self.runs_per_lane)

    return mapped

  def unstack(self, state: Any) -> list[Any]:
    """The state of each run of a sweep state (leaves `[runs, ...]` -> a list of states)."""
    return [jax.tree.map(lambda x, k=k: x[k], state) for k in range(_num_runs(state))]

  def stack(self, states: Sequence[Any]) -> Any:
    """Run states (each like `process.initialize()`) as one sweep state."""
    spec = jax.eval_shape(self.process.initialize)
    for k, state in enumerate(states):
      mismatch = tree_lib.tree_spec_mismatch(spec, state)
      if mismatch is not None:
        raise ValueError(f"states[{k}] is not a state of this sweep's process: {mismatch}")
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  def temp_bytes_per_run(self, state: Any, client_batches: Any, *client_states: Any) -> float:
    """XLA's temporary bytes of `next` compiled for these arguments, over the number of runs
    (the compilation is the one `next` itself uses: nothing is compiled twice)."""
    compiled = self.next.lower(state, client_batches, *client_states).compile()
    return compiled.memory_analysis().temp_size_in_bytes / _num_runs(state)


def _map_runs(fn: Callable[[Any], Any], xs: Any, runs_per_lane: int | None) -> Any:
  """`fn` over the leading run axis of `xs`: `runs_per_lane` runs vectorized together, the
  groups in sequence (`lax.map` with `batch_size`); all of them vectorized when None."""
  if runs_per_lane is None or runs_per_lane >= _num_runs(xs):
    return jax.vmap(fn)(xs)
  return jax.lax.map(fn, xs, batch_size=runs_per_lane)


def _num_runs(state: Any) -> int:
  return int(np.shape(jax.tree.leaves(state)[0])[0])


def _check_runs(runs: Any) -> tuple[SweepRun, ...]:
  if isinstance(runs, SweepRun) or not isinstance(runs, Sequence) or not runs:
    raise TypeError(f'runs must be a non-empty sequence of SweepRun; got {runs!r}')
  for k, run in enumerate(runs):
    if not isinstance(run, SweepRun):
      raise TypeError(f'runs[{k}] must be a SweepRun(seed, hparams); got {run!r}')
    if not isinstance(run.seed, int | np.integer) or isinstance(run.seed, bool):
      raise TypeError(f'runs[{k}].seed must be an int; got {run.seed!r}')
    if not isinstance(run.hparams, Mapping):
      raise TypeError(f'runs[{k}].hparams must be a mapping; got {run.hparams!r}')
  return tuple(runs)


def default_runs_per_lane(backend: str | None = None) -> int | None:
  """The runs a sweep's `next` vectorizes together on `backend` (default: JAX's): one on a CPU,
  whose cores a single run's round already keeps busy (vectorized runs there spill the caches
  and run every lane to the longest client), so the runs go one after another inside the
  program; all of them (None) on an accelerator, where one small model leaves the device idle."""
  return 1 if (backend or jax.default_backend()) == 'cpu' else None


def _check_runs_per_lane(value: Any) -> None:
  if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
    raise ValueError(f"runs_per_lane must be None, an int >= 1 or 'auto'; got {value!r}")


def build_sweep(
  process_fn: Callable[[int], _processes.LearningProcess],
  runs: Sequence[SweepRun],
  *,
  runs_per_lane: int | str | None = 'auto',
) -> Sweep:
  """K runs of one learning process as one compiled program.

  `process_fn(seed)` is called once per distinct seed of `runs`; the seed may change only what
  `initialize` returns (initial weights, keys held in state, as every builder's `seed=` and a
  model built with that seed do). Each run starts from its seed's initial state with its
  `hparams` set (`set_hparams`: cast to the state's dtypes, so every run has one state spec),
  and the runs' states are stacked. `next` is one compiled program of the first seed's
  `process.next` over the run axis, compiled once per argument shape.

  **Lanes are a budget.** `runs_per_lane` runs are vectorized together (`jax.vmap`: each step
  of the cohort loop advances that many runs' clients at once) and the groups of that size run
  one after another inside the program (`jax.lax.map(..., batch_size=runs_per_lane)`). The
  default, `default_runs_per_lane()`, is 1 on a CPU (the runs in sequence, in one program) and
  every run (None) on an accelerator. Every layout computes the same runs; they differ in speed
  and memory, and in float rounding where vectorization reorders sums.

  On its first trace, when the runs have two seeds or more, `next` is lowered for two of them
  and must give the same program (a seed that reaches `next`, e.g. through weights it closes
  over, would be silently replaced by the first seed's).

  Example:
    >>> def process_fn(seed):
    ...   model = fl.models.mlp_classifier(64, 10, seed=seed)
    ...   return fl.algorithms.build_weighted_fed_avg(
    ...       model, fl.optimizers.build_sgdm(0.1), seed=seed)
    >>> runs = [fl.templates.SweepRun(seed, {'client_work': {'learning_rate': lr}})
    ...         for lr in (0.03, 0.1) for seed in (0, 1)]
    >>> sweep = fl.templates.build_sweep(process_fn, runs)
    >>> state = sweep.initialize()  # leaves [4, ...]
    >>> state, metrics = sweep.next(state, client_batches)  # one cohort for all 4 runs
    >>> metrics['client_work']['train']['loss']  # [4]

  Args:
    process_fn: `seed -> LearningProcess`.
    runs: the `SweepRun`s.
    runs_per_lane: runs vectorized together (an int >= 1), None for all, or 'auto'
      (`default_runs_per_lane()`).

  Returns:
    A `Sweep`.
  """
  if not callable(process_fn):
    raise TypeError(f'process_fn must be callable seed -> LearningProcess; got {process_fn!r}')
  runs = _check_runs(runs)
  if runs_per_lane == 'auto':
    runs_per_lane = default_runs_per_lane()
  _check_runs_per_lane(runs_per_lane)
  processes = {}
  for run in runs:
    if run.seed not in processes:
      process = process_fn(int(run.seed))
      if not isinstance(process, _processes.LearningProcess):
        raise TypeError(
          f'process_fn({run.seed}) must return a LearningProcess; got {type(process).__name__}'
        )
      processes[run.seed] = process
  first, *others = processes.values()
  spec = jax.eval_shape(first.initialize)
  for seed, process in processes.items():
    mismatch = tree_lib.tree_spec_mismatch(spec, jax.eval_shape(process.initialize))
    if mismatch is not None:
      raise ValueError(
        f'process_fn({seed}) builds a state unlike process_fn({runs[0].seed}): {mismatch}. '
        'Tip: the seed may change values, not shapes (the model and optimizers stay the same).'
      )

  def initialize():
    states = []
    for k, run in enumerate(runs):
      process = processes[run.seed]
      try:
        states.append(process.set_hparams(process.initialize(), run.hparams))
      except (TypeError, ValueError) as error:
        raise type(error)(f'runs[{k}].hparams: {error}') from None
    return jax.tree.map(lambda *xs: jnp.stack(xs), *states)

  checked = []

  def next_fn(state, client_batches, *client_states):
    num_runs = _num_runs(state)
    per_run = np.ndim(client_batches.mask) == 4
    if per_run and np.shape(client_batches.mask)[0] != num_runs:
      raise ValueError(
        f'client_batches.mask has shape {np.shape(client_batches.mask)}: per-run cohorts need '
        f'a leading axis of {num_runs}, one cohort per run of the state'
      )
    if first.initial_client_state is not None and len(client_states) != 1:
      raise TypeError(
        'this sweep keeps per-client state: next(state, client_batches, client_states) with '
        "client_states leaves [runs, clients, ...] (each run's cohort states)"
      )
    if others and not checked:
      run_batches = jax.tree.map(lambda x: x[0], client_batches) if per_run else client_batches
      run_states = jax.tree.map(lambda x: x[0], client_states)
      _check_seed_free_next(first, others[0], spec, tree_lib.tree_specs((run_batches, *run_states)))
      checked.append(True)
    # Per run: its state, its cohort when each run has one, its client states when stateful.
    per_run_args = (state, *((client_batches,) if per_run else ()), *client_states)

    def run_next(args):
      run_state, *rest = args
      batches = rest.pop(0) if per_run else client_batches
      return first.next(run_state, batches, *rest)

    return _map_runs(run_next, per_run_args, runs_per_lane)

  return Sweep(runs, first, initialize, jax.jit(next_fn), runs_per_lane)


def _check_seed_free_next(first, other, state_spec, args_spec) -> None:
  """Raises unless two seeds' processes lower `next(state, *args)` to the same program
  (constants included)."""
  programs = {jax.jit(p.next).lower(state_spec, *args_spec).as_text() for p in (first, other)}
  if len(programs) > 1:
    raise ValueError(
      'process_fn(seed) builds a next that depends on the seed (two seeds compile to different '
      'programs, e.g. next closes over seeded weights), so one vectorized next cannot serve '
      'every run. Tip: let the seed reach only initialize (state), or run the seeds as '
      'separate sweeps.'
    )
