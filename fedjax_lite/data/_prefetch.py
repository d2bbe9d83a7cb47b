"""`Prefetcher`: builds the data of the next rounds in a background thread while the device runs
the current one."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import jax


class Prefetcher:
  """Calls `build_fn(round_num)` ahead of time, in order, on a background thread.

  Use it as the `training_selection_fn` of `fl.simulation.run_training_process`: asking for
  round r returns `build_fn(r)` (already on the device with `device_put=True`) and starts
  building r + 1, ... up to `buffer_size` rounds ahead. Asking for a round other than the next
  one (e.g. after a resume) restarts the thread from that round. Exceptions raised by
  `build_fn` are re-raised by the call that asks for that round.

  Example:
    >>> with fl.data.Prefetcher(lambda r: fl.data.batch_cohort(...), stop=total_rounds + 1) as p:
    ...   state = fl.simulation.run_training_process(process, p, total_rounds)

  Attributes:
    wait_seconds: total time callers spent blocked waiting for data.
  """

  def __init__(
    self,
    build_fn: Callable[[int], Any],
    *,
    stop: int | None = None,
    buffer_size: int = 1,
    device_put: bool = True,
  ):
    """Args:
    build_fn: `round_num -> data` (e.g. a `ClientBatches` of host arrays).
    stop: the first round not to build (None: build on until closed).
    buffer_size: rounds built ahead of the one in use (>= 1).
    device_put: whether to `jax.device_put` each result on the thread.
    """
    if not callable(build_fn):
      raise TypeError(f'build_fn must be callable round_num -> data; got {build_fn!r}')
    if not isinstance(buffer_size, int) or buffer_size < 1:
      raise ValueError(f'buffer_size must be an int >= 1; got {buffer_size!r}')
    self._build_fn = build_fn
    self._stop_round = stop
    self._buffer_size = buffer_size
    self._device_put = device_put
    self._thread: threading.Thread | None = None
    self._halt = threading.Event()
    self._queue: queue.Queue = queue.Queue()
    self._next_round: int | None = None
    self.wait_seconds = 0.0

  def __call__(self, round_num: int) -> Any:
    if self._stop_round is not None and round_num >= self._stop_round:
      raise ValueError(f'round_num={round_num} is at or past stop={self._stop_round}')
    if round_num != self._next_round:
      self._start(round_num)
    start = time.perf_counter()
    got_round, item, error = self._queue.get()
    self.wait_seconds += time.perf_counter() - start
    assert got_round == round_num, (got_round, round_num)
    self._next_round = round_num + 1
    if error is not None:
      self.close()
      raise error
    return item

  def _start(self, first_round: int) -> None:
    self.close()
    self._halt = threading.Event()
    self._queue = queue.Queue(maxsize=self._buffer_size)
    self._next_round = first_round
    self._thread = threading.Thread(
      target=self._work, args=(first_round, self._halt, self._queue), daemon=True
    )
    self._thread.start()

  def _work(self, round_num: int, halt: threading.Event, out: queue.Queue) -> None:
    while not halt.is_set() and (self._stop_round is None or round_num < self._stop_round):
      try:
        item = self._build_fn(round_num)
        if self._device_put and not _spans_processes(item):  # those are placed already
          item = jax.block_until_ready(jax.device_put(item))
        entry = (round_num, item, None)
      except Exception as error:  # handed to the caller of that round
        entry = (round_num, None, error)
      while not halt.is_set():
        try:
          out.put(entry, timeout=0.05)
          break
        except queue.Full:
          continue
      if entry[2] is not None:
        return
      round_num += 1

  def close(self) -> None:
    """Stops the thread; a later call starts it again."""
    if self._thread is not None:
      self._halt.set()
      self._thread.join()
      self._thread = None
    self._next_round = None

  def __enter__(self) -> Prefetcher:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()


def _spans_processes(item: Any) -> bool:
  """Whether `item` holds arrays sharded over several processes (`device_put` cannot move them)."""
  return any(isinstance(x, jax.Array) and not x.is_fully_addressable for x in jax.tree.leaves(item))
