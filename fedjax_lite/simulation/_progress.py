"""A progress bar over rounds (rich), showing the latest loss/accuracy and rounds per second
(compilation excluded), and `CompileTimer`, the seconds JAX spends compiling.

The bar is shown only when asked for, when rich imports and when its console is a terminal:
piped or captured output (CI logs, notebooks, pytest) gets no bar.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import jax

# jax.monitoring's events of a jit's compilation: trace to a jaxpr, lower to MLIR, XLA compile.
COMPILE_EVENTS = (
  '/jax/core/compile/jaxpr_trace_duration',
  '/jax/core/compile/jaxpr_to_mlir_module_duration',
  '/jax/core/compile/backend_compile_duration',
)


class CompileTimer:
  """The wall-clock seconds JAX spends compiling (tracing, lowering, XLA's compile), from
  jax.monitoring's time spans of `COMPILE_EVENTS`, counted once where they nest (a jit traced
  inside another) or overlap (threads).

  `take()` returns the seconds since the previous `take()` (or since the timer started);
  `total` is every second seen. Use it as a context manager, or call `close()`.

  Example:
    >>> with CompileTimer() as timer:
    ...   state, metrics = process.next(state, data)  # the first call compiles
    >>> timer.total  # seconds of it spent compiling
  """

  def __init__(self):
    self._spans: list[tuple[float, float]] = []
    self._lock = threading.Lock()
    self.total = 0.0
    jax.monitoring.register_event_time_span_listener(self._on_span)

  def _on_span(self, event: str, start: float, end: float, **kwargs: Any) -> None:
    del kwargs
    if event in COMPILE_EVENTS:
      with self._lock:
        self._spans.append((start, end))

  def take(self) -> float:
    """The compile seconds since the last `take()`: the length of the union of the spans."""
    with self._lock:
      spans, self._spans = sorted(self._spans), []
    seconds, reach = 0.0, -float('inf')
    for start, end in spans:
      if end > reach:
        seconds += end - max(start, reach)
        reach = end
    self.total += seconds
    return seconds

  def close(self) -> None:
    jax.monitoring.unregister_event_time_span_listener(self._on_span)

  def __enter__(self) -> CompileTimer:
    return self

  def __exit__(self, *exc_info) -> None:
    self.take()
    self.close()


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
    self._compile: CompileTimer | None = None
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
    self._compile = CompileTimer()

  @property
  def enabled(self) -> bool:
    return self._progress is not None

  def update(self, round_num: int, flat_metrics: dict[str, Any]) -> None:
    if self._progress is None:
      return
    self._rounds_done += 1
    self._compile.take()
    elapsed = time.perf_counter() - self._start_time - self._compile.total  # compiling excluded
    rate = self._rounds_done / max(elapsed, 1e-9)
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
    if self._compile.total:
      info += f' (compiled in {self._compile.total:.1f} s)'
    if 'layout/client_chunk_size' in flat_metrics:
      info += f'  chunk {flat_metrics["layout/client_chunk_size"]:.0f}'
    excluded = next((v for k, v in flat_metrics.items() if k.endswith('non_finite_clients')), 0)
    if excluded:
      info += f'  excluded {excluded:.0f} non-finite clients'
    self._progress.update(self._task, completed=round_num, info=info)

  def close(self) -> None:
    if self._compile is not None:
      self._compile.close()
      self._compile = None
    if self._progress is not None:
      self._progress.stop()
      self._progress = None
