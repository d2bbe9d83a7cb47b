"""The round's lane layout, measured: `client_chunk_size='auto'`.

How many clients share a vmapped step decides the round's speed, and the best number depends on
the machine and on what else runs on it: on a CPU, a few model copies fit the per-core cache
while more spill into a shared L3 that other tenants thrash; an accelerator wants hundreds. So a
process built with `client_chunk_size='auto'` (the default) does not fix the number: the first
time its `next` runs on concrete data of a new shape, a `TunedNext` compiles a few candidate
chunks, times each on that round's real cohort, keeps the fastest, and remembers it in memory
and on disk (`LayoutCache`), keyed by the machine and the shapes of the round's arguments. Later
rounds, later runs with the same shapes on the same kind of machine, and traced calls (a driver
that re-jits `next`, a sweep) use the remembered chunk; with none remembered, a traced call uses
the backend's default (`_cohort.default_chunk_size`).

The chunk changes the order of float sums only: the tuned round equals any fixed chunk's to
float tolerance.

Environment:
  FEDJAX_LITE_TUNE=0: never measure; `'auto'` is the backend's default chunk (as `--no-tune`).
  FEDJAX_LITE_CACHE_DIR: where `layouts.json` lives (default: JAX's compilation cache folder
    when one is set, else `~/.cache/fedjax_lite`).
"""

from __future__ import annotations

import collections
import contextvars
import dataclasses
import functools
import hashlib
import json
import math
import os
import platform
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import tree as tree_lib

AUTO = 'auto'
CACHE_FILE = 'layouts.json'
TUNE_ENV = 'FEDJAX_LITE_TUNE'
CACHE_DIR_ENV = 'FEDJAX_LITE_CACHE_DIR'
# A kept chunk is measured again when the median of the last `DRIFT_ROUNDS` rounds is
# `DRIFT_FACTOR` times the seconds it was chosen at (the host got busier, or quieter work was
# measured): the best chunk depends on what else runs on the machine.
DRIFT_FACTOR, DRIFT_ROUNDS = 1.5, 3
# Candidates the descent timed within `CONFIRM_WITHIN` of the fastest are timed again, in turn,
# `CONFIRM_ROUNDS` times: a busy host's noise (±10-20% a round) is larger than their gaps.
CONFIRM_WITHIN, CONFIRM_ROUNDS = 1.25, 2
# Medians within `CONFIRM_TIE` of the best are a tie (below the timing noise), won by fewer lanes.
CONFIRM_TIE = 0.03
_CPU_CANDIDATES = (1, 2, 4, 8, 16)
_ACCELERATOR_CANDIDATES = (64, 128, 256, 512, 1024)

# The chunk a `TunedNext` variant is tracing with; `_cohort` reads it for `'auto'`.
_TRACED_CHUNK: contextvars.ContextVar[int | None] = contextvars.ContextVar(
  'fedjax_lite_client_chunk', default=None
)


def traced_chunk() -> int | None:
  """The client chunk the round being traced was asked for by its `TunedNext`, or None."""
  return _TRACED_CHUNK.get()


def _dtype(x: Any) -> Any:
  """`x`'s dtype, cheaply for arrays and specs (`jnp.result_type` for Python scalars)."""
  dtype = getattr(x, 'dtype', None)
  return jnp.result_type(x) if dtype is None else dtype


def tuning_enabled() -> bool:
  return os.environ.get(TUNE_ENV, '1').strip().lower() not in ('0', 'false', 'no', 'off')


def effective_chunk(chunk: int, num_clients: int) -> int:
  """The lanes a chunk of `chunk` really has over `num_clients` (the cohort loop evens chunks:
  100 clients at 32 run as 4 chunks of 25)."""
  chunk = max(1, min(chunk, num_clients))
  num_chunks = -(-num_clients // chunk)
  return -(-num_clients // num_chunks)


def candidates(num_clients: int, backend: str | None = None) -> list[int]:
  """The chunks worth timing for a cohort of `num_clients` on `backend` (default: JAX's),
  ascending, each a distinct layout once chunks are evened."""
  backend = backend or jax.default_backend()
  base = _CPU_CANDIDATES if backend == 'cpu' else _ACCELERATOR_CANDIDATES
  return sorted({effective_chunk(c, num_clients) for c in base})


@functools.cache
def machine() -> str:
  """What makes timings comparable: the backend, its devices and, on a CPU, the processor and
  the cores this process may use."""
  devices = jax.devices()
  name = f'{devices[0].platform}:{devices[0].device_kind}x{len(devices)}'
  if devices[0].platform == 'cpu':
    cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
    name += f':{_processor()}:{cores}cores'
  return name


@functools.cache
def _processor() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def default_cache_dir() -> str:
  """`$FEDJAX_LITE_CACHE_DIR`, else JAX's compilation cache folder, else
  `~/.cache/fedjax_lite`."""
  folder = os.environ.get(CACHE_DIR_ENV) or jax.config.jax_compilation_cache_dir
  return folder or os.path.join(os.path.expanduser('~'), '.cache', 'fedjax_lite')


class LayoutCache:
  """Chosen chunks on disk: `<folder>/layouts.json`, `{key: {'chunk', 'seconds', ...}}`.

  An unreadable file or entry is ignored with a warning (the layout is measured again and the
  entry rewritten); writes replace the file atomically, so readers never see half of one.
  """

  def __init__(self, folder: str | os.PathLike | None = None):
    self.path = os.path.join(os.fspath(folder or default_cache_dir()), CACHE_FILE)

  def _entries(self) -> dict[str, Any]:
    try:
      with open(self.path) as f:
        entries = json.load(f)
    except FileNotFoundError:
      return {}
    except (OSError, ValueError) as error:
      warnings.warn(f'ignoring the layout cache {self.path}: {error}', RuntimeWarning, 3)
      return {}
    if not isinstance(entries, dict):
      warnings.warn(f'ignoring the layout cache {self.path}: not a mapping', RuntimeWarning, 3)
      return {}
    return entries

  def get(self, key: str) -> int | None:
    """The chunk stored for `key`, or None (none stored, or an entry that makes no sense)."""
    entry = self._entries().get(key)
    if entry is None:
      return None
    chunk = entry.get('chunk') if isinstance(entry, dict) else None
    if isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1:
      warnings.warn(
        f'ignoring a corrupted entry of the layout cache {self.path} ({entry!r}); measuring again',
        RuntimeWarning,
        3,
      )
      return None
    return chunk

  def timing(self, key: str) -> float | None:
    """The seconds a round took with the stored chunk of `key` when it was measured, or None."""
    entry = self._entries().get(key)
    try:
      return float(entry['seconds'][str(entry['chunk'])])
    except (TypeError, KeyError, ValueError):
      return None

  def put(self, key: str, chunk: int, seconds: dict[int, float], description: str) -> None:
    """Stores `chunk` for `key` with the timings it won (seconds per candidate chunk)."""
    entries = self._entries()
    entries[key] = {
      'chunk': int(chunk),
      'seconds': {str(c): float(s) for c, s in sorted(seconds.items())},
      'round': description,
    }
    folder = os.path.dirname(self.path)
    try:
      os.makedirs(folder, exist_ok=True)
      with tempfile.NamedTemporaryFile('w', dir=folder, delete=False, suffix='.tmp') as f:
        json.dump(entries, f, indent=1, sort_keys=True)
      os.replace(f.name, self.path)
    except OSError as error:  # a read-only home: the choice still holds for this process
      warnings.warn(f'could not write the layout cache {self.path}: {error}', RuntimeWarning, 3)


def _wall_seconds(chunk: int, run: Callable[[], Any]) -> float:
  del chunk
  start = time.perf_counter()
  run()
  return time.perf_counter() - start


def _agreed(value: float) -> float:
  """`value` as process 0 has it, in every process of a multi-process run (so every process
  takes the same path through the search and compiles the same candidates)."""
  if jax.process_count() == 1:
    return value
  from jax.experimental import multihost_utils

  return float(multihost_utils.broadcast_one_to_all(np.float64(value)))


def search(
  chunks: Sequence[int],
  measure: Callable[[int], float],
  start: int,
  over_budget: Callable[[], bool] = lambda: False,
) -> int:
  """The chunk a descent from `chunks[start]` ends at: it moves to the faster neighbour (by
  `measure(chunk)`, seconds, each measured once) while one is faster. Chunk sizes have one
  best region (too few lanes waste the vector units, too many spill the cache), so this
  measures 3 or 4 of them instead of all. Once `over_budget()`, no new chunk is measured: the
  fastest measured so far is kept."""
  seconds: dict[int, float] = {}

  def timed(i):
    if i not in seconds:
      seconds[i] = math.inf if over_budget() else measure(chunks[i])
    return seconds[i]

  i = start
  while True:
    here = timed(i)
    around = [j for j in (i - 1, i + 1) if 0 <= j < len(chunks)]
    best = min(around, key=timed, default=None)
    if best is None or timed(best) >= here:
      return chunks[i]
    i = best


def confirm(
  samples: dict[int, list[float]],
  time_once: Callable[[int], float],
  over_budget: Callable[[], bool] = lambda: False,
) -> int:
  """The fewest lanes within `CONFIRM_TIE` of the lowest median seconds, once the close
  finalists are timed again.

  The descent times candidates one after another, so a host whose load comes and goes can
  favour whichever ran in a quiet moment. Candidates within `CONFIRM_WITHIN` of the fastest
  are timed up to `CONFIRM_ROUNDS` more times, interleaved (every finalist once a round, in
  turn; a round after the first only while not `over_budget()`), and `samples` (seconds per
  chunk, extended in place) decides by median. Between chunks that close, the smaller one is
  kept: its working set is smaller, so it loses less when a neighbour thrashes the shared cache.
  """
  fastest = min(min(times) for times in samples.values())
  finalists = sorted(c for c, times in samples.items() if min(times) <= CONFIRM_WITHIN * fastest)
  if len(finalists) > 1:
    for r in range(CONFIRM_ROUNDS):
      if r and over_budget():
        break
      for chunk in finalists[r % len(finalists) :] + finalists[: r % len(finalists)]:
        samples[chunk].append(time_once(chunk))
  medians = {c: statistics.median(times) for c, times in samples.items()}
  best = min(medians.values())
  return min(c for c, m in medians.items() if m <= (1 + CONFIRM_TIE) * best)


@dataclasses.dataclass
class _Choices:
  """What a `TunedNext` (and its donating twin) knows per key: the chunk chosen, the seconds
  a round took when it was chosen, the latest rounds' seconds, and the keys to measure again
  whatever the disk cache holds."""

  chosen: dict[str, int | None] = dataclasses.field(default_factory=dict)
  expected: dict[str, float] = dataclasses.field(default_factory=dict)
  recent: dict[str, collections.deque] = dataclasses.field(default_factory=dict)
  stale: set[str] = dataclasses.field(default_factory=set)


class TunedNext:
  """A round's `next` whose client chunk is measured per shape of its arguments.

  Calls with concrete arrays of a new shape first `tune` (compile candidates, time them on these
  arguments, keep the fastest); traced calls use the chunk chosen for their shape, else the
  backend's default. `lower`, `eval_shape` and `_cache_size` read as those of a jitted
  function. `layout(*args)` says what a call with these arguments runs with.

  Args:
    next_fn: the round, traceable; its cohort loops run with `client_chunk_size='auto'`.
    num_clients_fn: `args -> clients of the round` (for the candidates and the default).
    key_args: `args -> what identifies the layout's shape` (pytree of arrays or
      `jax.ShapeDtypeStruct`s); default `args` whole. A round keys on its client data without
      the step axis: the best chunk does not depend on how many steps a cohort pads to, so a
      bucketed population measures once, not once per bucket.
    cache: where choices persist across processes (default: `LayoutCache()`).
    timer: `(chunk, run) -> seconds` of one call of the compiled candidate (`run()` calls it
      and waits); the wall clock by default, a fake clock in tests.
    repeats: calls timed per candidate in the descent, where the fastest counts; `confirm`
      then decides between close candidates by the median of all their calls.
    budget_seconds: once measuring has taken this long (compiling included), no further
      candidate is tried; the fastest so far is kept.
    donate_state: the state argument is donated (see `with_donated_state`).
  """

  def __init__(
    self,
    next_fn: Callable[..., Any],
    num_clients_fn: Callable[[tuple], int],
    *,
    key_args: Callable[[tuple], Any] = lambda args: args,
    cache: LayoutCache | None = None,
    timer: Callable[[int, Callable[[], Any]], float] = _wall_seconds,
    repeats: int = 2,
    budget_seconds: float = 4.0,
    donate_state: bool = False,
  ):
    functools.update_wrapper(self, next_fn)
    self._next_fn, self._num_clients, self._key_args = next_fn, num_clients_fn, key_args
    self._cache, self._timer, self._repeats = cache, timer, repeats
    self._budget, self._donate = budget_seconds, donate_state
    self._variants: dict[int | None, Any] = {}
    self._choices = _Choices()
    self._last_key: str | None = None
    self._keys: dict[tuple, str] = {}
    self.measured = False  # whether the last `tune` measured candidates

  def with_donated_state(self) -> TunedNext:
    """This `next` with its state argument donated (`jax.jit(..., donate_argnums=0)`: the
    round reuses the buffers of the state it replaces), sharing its choices. A driver that owns
    the state calls this one: the candidate it keeps is the program it then runs, compiled
    once."""
    donating = TunedNext(
      self._next_fn,
      self._num_clients,
      key_args=self._key_args,
      cache=self._cache,
      timer=self._timer,
      repeats=self._repeats,
      budget_seconds=self._budget,
      donate_state=True,
    )
    donating._choices = self._choices
    return donating

  def _variant(self, chunk: int | None):
    """`next_fn` jitted to trace its cohort loops with `chunk` (None: the default)."""
    if chunk not in self._variants:
      donate = (0,) if self._donate else ()
      if chunk is None:
        self._variants[chunk] = jax.jit(self._next_fn, donate_argnums=donate)
      else:

        def with_chunk(*args, **kwargs):
          token = _TRACED_CHUNK.set(chunk)
          try:
            return self._next_fn(*args, **kwargs)
          finally:
            _TRACED_CHUNK.reset(token)

        with_chunk.__name__ = with_chunk.__qualname__ = self._next_fn.__name__
        self._variants[chunk] = jax.jit(with_chunk, donate_argnums=donate)
    return self._variants[chunk]

  def key(self, *args) -> str:
    """The cache key of a call: the machine and the shapes and dtypes of its arguments (those
    of `key_args`)."""
    leaves, structure = jax.tree.flatten(self._key_args(args))
    signature = (structure, *((np.shape(x), _dtype(x)) for x in leaves))
    if signature not in self._keys:  # asked every round: hashed once per shape
      shapes = [(tuple(shape), str(dtype)) for shape, dtype in signature[1:]]
      text = f'{machine()}|{jax.__version__}|{structure}|{shapes}'
      self._keys[signature] = hashlib.sha256(text.encode()).hexdigest()[:32]
    return self._keys[signature]

  def layout(self, *args) -> int:
    """The client chunk (lanes) a call with `args` runs with."""
    return self._lanes(self.key(*args), args)

  def _lanes(self, key: str, args: tuple) -> int:
    chunk = self._choices.chosen.get(key)
    num_clients = self._num_clients(args)
    if chunk is None:
      from fedjax_lite.templates import _cohort

      chunk = _cohort.default_chunk_size(num_clients)
    return effective_chunk(chunk, num_clients)

  def tune(self, *args) -> int:
    """Chooses the chunk for calls shaped as `args` (concrete arrays): remembered, cached on
    disk, or measured now on `args`; returns its lanes. Measuring is skipped with
    `FEDJAX_LITE_TUNE=0` (the default chunk is used). `measured` says whether this call
    measured."""
    key = self._last_key = self.key(*args)
    self.measured = False
    if key in self._choices.chosen:
      return self._lanes(key, args)
    chunk = None
    if tuning_enabled():
      cache = self._cache if self._cache is not None else LayoutCache()
      stored = None if key in self._choices.stale else cache.get(key)
      if jax.process_count() > 1:  # process 0's cache decides for every process
        stored = int(_agreed(-1 if stored is None else stored))
        stored = None if stored < 0 else stored
      if stored is not None:
        chunk, expected = stored, cache.timing(key)
      else:
        chunk, expected = self._measure(key, cache, args)
        self.measured = True
      self._choices.stale.discard(key)
      if expected is not None:
        self._choices.expected[key] = expected
    self._choices.chosen[key] = chunk
    return self._lanes(key, args)

  def observe(self, seconds: float) -> bool:
    """Records that a round shaped as the last `tune`'s took `seconds` (compiling and
    measuring excluded). When the last `DRIFT_ROUNDS` took `DRIFT_FACTOR` times the seconds the
    chunk was chosen at, the choice is dropped and the next `tune` measures again (ignoring the
    disk cache); returns whether it was. One process only: in a multi-process run the processes
    would have to agree on when, so they keep their choice."""
    key = self._last_key
    if key not in self._choices.expected or jax.process_count() > 1 or not tuning_enabled():
      return False
    recent = self._choices.recent.setdefault(key, collections.deque(maxlen=DRIFT_ROUNDS))
    recent.append(seconds)
    if (
      len(recent) < DRIFT_ROUNDS
      or statistics.median(recent) < DRIFT_FACTOR * self._choices.expected[key]
    ):
      return False
    for table in (self._choices.chosen, self._choices.expected, self._choices.recent):
      table.pop(key, None)
    self._choices.stale.add(key)
    return True

  def _measure(self, key: str, cache: LayoutCache, args: tuple) -> tuple[int, float | None]:
    """`(the fastest chunk, its seconds)`, measured on `args` and stored in `cache`."""
    from fedjax_lite.templates import _cohort

    num_clients = self._num_clients(args)
    chunks = candidates(num_clients)
    default = effective_chunk(_cohort.default_chunk_size(num_clients), num_clients)
    start = min(range(len(chunks)), key=lambda i: abs(chunks[i] - default))
    samples: dict[int, list[float]] = {}
    runs: dict[int, Callable[[], Any]] = {}

    def time_once(chunk):
      return _agreed(self._timer(chunk, runs[chunk]))

    def measure(chunk):
      compiled = self._variant(chunk).lower(*args).compile()  # the call later reuses it

      def run():
        state = jax.tree.map(jnp.copy, args[0]) if self._donate else args[0]
        jax.block_until_ready(compiled(state, *args[1:]))

      runs[chunk] = run
      samples[chunk] = [time_once(chunk) for _ in range(self._repeats)]
      return min(samples[chunk])

    if len(chunks) == 1:  # nothing to choose
      return chunks[0], None
    began = time.perf_counter()
    over_budget = lambda: _agreed(time.perf_counter() - began) > self._budget
    chunk = search(chunks, measure, start, over_budget)
    if samples:
      chunk = confirm(samples, time_once, over_budget)
    seconds = {c: statistics.median(times) for c, times in samples.items()}
    specs = jax.tree.leaves(tree_lib.tree_specs(args[1:]))
    description = f'{num_clients} clients per device; ' + ', '.join(
      f'{tuple(s.shape)} {s.dtype}' for s in specs[:4]
    )
    if jax.process_index() == 0:
      cache.put(key, chunk, seconds, description)
    return chunk, seconds.get(chunk)

  def __call__(self, *args, **kwargs):
    key = self.key(*args)
    traced = any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args))
    if key not in self._choices.chosen and not traced:
      self.tune(*args)
    return self._variant(self._choices.chosen.get(key))(*args, **kwargs)

  def lower(self, *args, **kwargs):
    return self._variant(self._choices.chosen.get(self.key(*args))).lower(*args, **kwargs)

  def eval_shape(self, *args, **kwargs):
    return self._variant(None).eval_shape(*args, **kwargs)

  def trace(self, *args, **kwargs):
    return self._variant(self._choices.chosen.get(self.key(*args))).trace(*args, **kwargs)

  def _cache_size(self) -> int:
    """Programs compiled for calls (the candidates compiled ahead of time while tuning are
    not counted)."""
    return sum(variant._cache_size() for variant in self._variants.values())
