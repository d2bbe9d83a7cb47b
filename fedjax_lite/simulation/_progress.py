"""A progress bar over rounds (rich), showing the latest loss/accuracy and rounds per second.

Shown only when asked for, when rich imports and when its console is a terminal: piped or
captured output (CI logs, notebooks, pytest) gets no bar.
"""

from __future__ import annotations

import time
from typing import Any

_TRAIN_LOSS_KEYS = ('client_work/train/loss', 'train/loss', 'loss')
_TRAIN_ACCURACY_KEYS = ('client_work/train/accuracy', 'train/accuracy', 'accuracy')
_EVAL_ACCURACY_KEY = 'evaluation/accuracy'


def _first(flat: dict[str, Any], keys: tuple[str, ...]) -> Any:
  return next((flat[k] for k in keys if k in flat), None)


class RoundProgress:
  """`update(round_num, flat_metrics)` after each round, `close()` at the end."""

  def __init__(self, total_rounds: int, start_round: int, enabled: bool, console: Any = None):
    """Args:
    total_rounds: the last round.
    start_round: the first round this run executes (rounds before it count as done).
    enabled: whether a bar is wanted at all (e.g. `not quiet`).
    console: a `rich.console.Console` (default: one on stdout).
    """
    self._progress = None
    self._eval = ''
    if not enabled:
      return
    try:
      from rich import console as rich_console
      from rich import progress as rich_progress
    except ImportError:
      return
    console = console if console is not None else rich_console.Console()
    if not console.is_terminal:
      return
    self._progress = rich_progress.Progress(
      rich_progress.TextColumn('round {task.completed}/{task.total}'),
      rich_progress.BarColumn(),
      rich_progress.TextColumn('{task.fields[info]}'),
      rich_progress.TimeElapsedColumn(),
      console=console,
    )
    self._task = self._progress.add_task(
      'rounds', total=total_rounds, completed=start_round - 1, info=''
    )
    self._progress.start()
    self._start_time = time.perf_counter()
    self._rounds_done = 0

  @property
  def enabled(self) -> bool:
    return self._progress is not None

  def update(self, round_num: int, flat_metrics: dict[str, Any]) -> None:
    if self._progress is None:
      return
    self._rounds_done += 1
    rate = self._rounds_done / max(time.perf_counter() - self._start_time, 1e-9)
    loss = _first(flat_metrics, _TRAIN_LOSS_KEYS)
    accuracy = _first(flat_metrics, _TRAIN_ACCURACY_KEYS)
    if _EVAL_ACCURACY_KEY in flat_metrics:
      self._eval = f'eval acc {flat_metrics[_EVAL_ACCURACY_KEY]:.4f}  '
    info = ''
    if isinstance(loss, float):
      info += f'loss {loss:.4f}  '
    if isinstance(accuracy, float):
      info += f'acc {accuracy:.4f}  '
    info += f'{self._eval}{rate:.2f} rounds/s'
    excluded = next((v for k, v in flat_metrics.items() if k.endswith('non_finite_clients')), 0)
    if excluded:
      info += f'  excluded {excluded:.0f} non-finite clients'
    self._progress.update(self._task, completed=round_num, info=info)

  def close(self) -> None:
    if self._progress is not None:
      self._progress.stop()
      self._progress = None
