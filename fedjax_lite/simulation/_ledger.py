"""`RunLedger`: what one run records between its rounds, whichever driver advances it.

A round's compiled call is the driver's (one run, a group of a sweep); everything after it is the
run's: when it evaluates and checkpoints, the flat metrics it releases (process metrics,
`evaluation/*`, `timing/*`, `privacy/epsilon`), its client-state store's commit before each
checkpoint, where its privacy budget ends it, and its final checkpoint kept.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax

from fedjax_lite.simulation import _metrics_managers

EVALUATION_KEY = 'evaluation'
TIMING_KEY = 'timing'
PRIVACY_KEY = 'privacy'


def flat_with(prefix: str, metrics: Mapping[str, Any]) -> dict[str, Any]:
  """`metrics` flattened under `prefix` (`{'prefix/key': value}`)."""
  return _metrics_managers.flatten_metrics({prefix: metrics})


def examples_in(flat: Mapping[str, Any]) -> Any:
  """The first flat process metric named `num_examples` (FedAvg: client_work/train/...)."""
  return next((v for k, v in flat.items() if k.rsplit('/', 1)[-1] == 'num_examples'), None)


def evaluate(evaluation_fn, evaluation_selection_fn, state, round_num) -> tuple[dict, float]:
  """`(evaluation_fn(state, evaluation_selection_fn(round_num)), seconds)`, checked."""
  start = time.perf_counter()
  metrics = evaluation_fn(state, evaluation_selection_fn(round_num))
  jax.block_until_ready(metrics)
  seconds = time.perf_counter() - start
  if not isinstance(metrics, Mapping):
    raise TypeError(f'evaluation_fn must return a mapping of metrics; got {type(metrics).__name__}')
  return dict(metrics), seconds


class RunLedger:
  """One run's records between rounds.

  Args:
    last_round: the run's last round (its total, or the last its privacy budget allows).
    checkpoint_manager: saves the run's state (None: no checkpoints).
    metrics_managers: where each round's flat metrics are released.
    evaluate: `(state, round_num) -> (metrics, seconds)`, or None.
    rounds_per_evaluation, rounds_per_checkpoint: the schedules (the last round always both).
    privacy_accountant: its `epsilon(round_num)` is released as `privacy/epsilon`, or None.
    client_state_store: committed before each checkpoint, so a checkpoint never outlives the
      client states of its round; or None.
    reserved: top-level metric keys besides evaluation, timing and privacy that the driver adds.
  """

  def __init__(
    self,
    last_round: int,
    *,
    checkpoint_manager: Any = None,
    metrics_managers: Iterable[Any] = (),
    evaluate: Callable[[Any, int], tuple[dict, float]] | None = None,
    rounds_per_evaluation: int = 1,
    rounds_per_checkpoint: int = 1,
    privacy_accountant: Any = None,
    client_state_store: Any = None,
    reserved: tuple[str, ...] = (),
  ):
    self.last_round = last_round
    self.checkpoint_manager = checkpoint_manager
    self.managers = list(metrics_managers)
    self._evaluate = evaluate
    self._rounds_per_evaluation = rounds_per_evaluation
    self._rounds_per_checkpoint = rounds_per_checkpoint
    self._accountant = privacy_accountant
    self.client_state_store = client_state_store
    self._reserved = (EVALUATION_KEY, TIMING_KEY, PRIVACY_KEY, *reserved)

  def resume_at(self, round_num: int) -> None:
    """The run resumes from its checkpoint of `round_num`: its client-state store rolls back to
    that round (refusing a store that has not reached it) and what an interrupted run released
    after it is dropped."""
    if self.client_state_store is not None:
      self.client_state_store.rollback(round_num)
    self._clear_after(round_num + 1)

  def _clear_after(self, first_round: int) -> None:
    """Drops what an interrupted run released from `first_round` on (metrics managers that can)."""
    for manager in self.managers:
      clear = getattr(manager, 'clear_metrics', None)
      if clear is not None:
        clear(first_round)

  def release(self, flat: dict[str, Any], round_num: int) -> None:
    for manager in self.managers:
      manager.release(flat, round_num)

  def save(self, state: Any, round_num: int) -> None:
    """Checkpoints `state` as round `round_num`, the client states committed first."""
    if self.client_state_store is not None:
      rounds = getattr(self.checkpoint_manager, 'checkpoint_rounds', list)()
      self.client_state_store.commit(round_num, rounds)
    self.checkpoint_manager.save_checkpoint(state, round_num)

  def start(self, state: Any, evaluation: tuple[dict, float] | None = None) -> None:
    """Round 0 of a fresh run: whatever an earlier, interrupted start released is dropped, and
    the initial state evaluated (or `evaluation`, `(metrics, seconds)` computed by the driver),
    released and checkpointed."""
    self._clear_after(0)
    if self._evaluate is not None:
      evaluation, seconds = evaluation or self._evaluate(state, 0)
      flat = flat_with(EVALUATION_KEY, evaluation)
      self.release({**flat, **flat_with(TIMING_KEY, {'evaluation_seconds': seconds})}, 0)
    if self.checkpoint_manager is not None:
      self.save(state, 0)

  def evaluates(self, round_num: int) -> bool:
    every = round_num % self._rounds_per_evaluation == 0
    return self._evaluate is not None and (every or round_num == self.last_round)

  def saves(self, round_num: int) -> bool:
    every = round_num % self._rounds_per_checkpoint == 0
    return self.checkpoint_manager is not None and (every or round_num == self.last_round)

  def needs_state(self, round_num: int) -> bool:
    """Whether `end_round` reads the state of this round (to evaluate or checkpoint it)."""
    return self.evaluates(round_num) or self.saves(round_num)

  def end_round(
    self,
    round_num: int,
    process_metrics: Any,
    state: Any,
    timing: dict[str, float],
    extra: Mapping[str, Any] | None = None,
    evaluation: tuple[dict, float] | None = None,
  ) -> dict[str, Any]:
    """Releases round `round_num`'s flat metrics and evaluates and checkpoints it when due.

    `timing` holds `data_seconds` and `train_seconds`; `examples_per_second`,
    `evaluation_seconds` and `round_seconds` are added. `extra` holds flat driver metrics
    (e.g. `memory/...`). `evaluation`, `(metrics, seconds)`, is this round's evaluation when
    the driver computed it (e.g. for a group of runs at once). Returns the released flat
    metrics.
    """
    if not isinstance(process_metrics, Mapping):
      raise TypeError(
        f'process.next must return (state, metrics mapping); metrics is '
        f'{type(process_metrics).__name__}'
      )
    for key in self._reserved:
      if key in process_metrics:
        raise ValueError(f'process metrics have a top-level {key!r} key, which the driver adds')
    flat = _metrics_managers.flatten_metrics(process_metrics)
    timing = dict(timing)
    num_examples = examples_in(flat)
    if num_examples is not None:
      timing['examples_per_second'] = num_examples / max(timing['train_seconds'], 1e-12)
    timing['round_seconds'] = timing['data_seconds'] + timing['train_seconds']
    if self.evaluates(round_num):
      evaluation, seconds = evaluation or self._evaluate(state, round_num)
      flat.update(flat_with(EVALUATION_KEY, evaluation))
      timing['evaluation_seconds'] = seconds
      timing['round_seconds'] += seconds
    flat.update(flat_with(TIMING_KEY, timing))
    flat.update(extra or {})
    if self._accountant is not None:
      flat.update(flat_with(PRIVACY_KEY, {'epsilon': self._accountant.epsilon(round_num)}))
    self.release(flat, round_num)
    if self.saves(round_num):
      self.save(state, round_num)
    return flat

  def finish(self, final_round: int | None = None) -> None:
    """The run completed (every round, or all its budget allows): its final checkpoint (of
    `final_round`, default `last_round`) is kept through pruning when the run is extended."""
    final_round = self.last_round if final_round is None else final_round
    mark_kept = getattr(self.checkpoint_manager, 'mark_kept', None)
    if mark_kept is not None and final_round in self.checkpoint_manager.checkpoint_rounds():
      mark_kept(final_round)
