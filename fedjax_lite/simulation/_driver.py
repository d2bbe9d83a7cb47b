"""`drive`: the one round loop of every kind of run.

A run's records between rounds are its `RunLedger`'s (schedules, metrics, checkpoints, client
states, privacy budget). What advances runs is a `Runner`: one process's state
(`run_training_process`, also each process of a multi-process run), or a group of a sweep's runs
stacked on a run axis (`run_sweep`). `drive` starts every runner (resumed from its checkpoints or
initialized as round 0), builds each round's data once, hands it to every runner still behind
that round, shows progress, and finishes the runners that completed.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from fedjax_lite.simulation import _progress


class Runner(Protocol):
  """Advances some runs (one, or a group of a sweep's) round by round.

  Attributes:
    round: the round its state is the result of (0 after initialization; the restored round
      after a resume), set by `start` and advanced by `step`.
    last_round: the last round any of its runs trains (its total, or where ε budgets end them).
  """

  round: int
  last_round: int

  def start(self) -> None:
    """Resumes from the latest checkpoint, or initializes, releases and checkpoints round 0."""

  def step(self, round_num: int, data: Any, data_seconds: float) -> list[dict[str, Any]]:
    """Runs round `round_num` on `data` (its build took `data_seconds`); returns the flat metrics
    each of its runs released (none for a run already finished)."""

  def finish(self) -> None:
    """Its runs completed: each run's final checkpoint is kept."""


def drive(
  runners: Sequence[Runner], training_selection_fn: Callable[[int], Any], progress: bool
) -> None:
  """Starts `runners`, then runs rounds from the earliest one's next round to the last of any.

  Round r's data, `training_selection_fn(r)`, is built once and given to every runner with
  `round < r <= last_round`, in order. The progress bar shows the metrics of a lone run.
  """
  for runner in runners:
    runner.start()
  first_round = min(runner.round for runner in runners) + 1
  final_round = max(max(runner.last_round for runner in runners), first_round - 1)
  bar = _progress.RoundProgress(final_round, first_round, progress)
  try:
    for round_num in range(first_round, final_round + 1):
      advancing = [r for r in runners if r.round < round_num <= r.last_round]
      if not advancing:
        continue
      start = time.perf_counter()
      data = training_selection_fn(round_num)
      data_seconds = time.perf_counter() - start
      released = []
      for runner in advancing:
        released += runner.step(round_num, data, data_seconds)
      bar.update(round_num, released[0] if len(released) == 1 else {})
    for runner in runners:
      runner.finish()
  finally:
    bar.close()
