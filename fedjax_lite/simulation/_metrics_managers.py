"""Metrics managers: where the driver releases each round's metrics (TFF's release managers).

Every manager has `release(metrics, round_num)`, `clear_metrics(round_num)` and `close()`.
Metrics are flattened to `{'a/b/c': python scalar}` by `flatten_metrics`. `clear_metrics(r)`
forgets every round >= r; the driver calls it before its first round (`r` = the first round it
will run, 0 on a fresh start), so a resumed run's outputs equal an uninterrupted run's.
"""

from __future__ import annotations

import abc
import csv
import io
import json
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from fedjax_lite.simulation import _files

ROUND_KEY = 'round_num'


def flatten_metrics(metrics: Mapping[str, Any]) -> dict[str, Any]:
  """Nested metrics as one flat dict with '/'-joined keys and Python values.

  Mappings and NamedTuples nest by key/field name, lists and tuples by index. Scalars (jax or
  numpy arrays of shape `[]`, numpy scalars) become Python `int`/`float`/`bool`; an array with
  axes is spread over its indices (`'confusion/0/1'`); strings pass through. Empty containers
  add nothing. Flattening a flat dict returns it unchanged.

  Example:
    >>> flatten_metrics({'client_work': {'train': {'loss': jnp.float32(0.5)}}})
    {'client_work/train/loss': 0.5}
  """
  if not isinstance(metrics, Mapping):
    raise TypeError(f'metrics must be a mapping of name -> value; got {type(metrics).__name__}')
  leaves: list[tuple[str, Any]] = []
  _collect_leaves(leaves, '', metrics)
  # One device_get for all leaves (not per leaf); a list keeps the mappings' own key order.
  values = jax.device_get([value for _, value in leaves])
  flat: dict[str, Any] = {}
  for (key, _), value in zip(leaves, values, strict=True):
    if isinstance(value, np.ndarray) and value.ndim:
      for index in np.ndindex(value.shape):
        flat['/'.join([key, *map(str, index)])] = _python_scalar(key, value[index])
    else:
      flat[key] = _python_scalar(key, value)
  return flat


def _collect_leaves(leaves: list[tuple[str, Any]], key: str, value: Any) -> None:
  if isinstance(value, Mapping):
    items = value.items()
  elif isinstance(value, tuple) and hasattr(value, '_fields'):
    items = zip(value._fields, value, strict=True)
  elif isinstance(value, list | tuple):
    items = enumerate(value)
  else:
    leaves.append((key, value))
    return
  for name, item in items:
    _collect_leaves(leaves, f'{key}/{name}' if key else str(name), item)


def _python_scalar(key: str, value: Any) -> Any:
  if isinstance(value, np.ndarray | np.generic):
    value = value.item()
  if isinstance(value, bool | int | float | str):
    return value
  raise TypeError(
    f'metric {key!r} has a value of type {type(value).__name__}; expected a number, an array, '
    'a string or a nested mapping of them'
  )


def _check_round_num(round_num: Any) -> None:
  if not isinstance(round_num, int | np.integer) or isinstance(round_num, bool) or round_num < 0:
    raise ValueError(f'round_num must be an int >= 0; got {round_num!r}')


class MetricsManager(abc.ABC):
  """The interface the driver releases metrics to; subclass it for a custom sink.

  A custom manager needs only `release`; `clear_metrics` and `close` default to doing nothing.
  """

  @abc.abstractmethod
  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    """Records the metrics of round `round_num` (0: before training)."""

  def clear_metrics(self, round_num: int) -> None:  # noqa: B027 (optional hook)
    """Forgets the metrics of every round >= `round_num`."""

  def close(self) -> None:  # noqa: B027 (optional hook)
    """Flushes and releases resources; the manager is not used afterwards."""

  def __enter__(self):
    return self

  def __exit__(self, *exc_info):
    self.close()


class InMemoryMetricsManager(MetricsManager):
  """Keeps `metrics`: a dict round_num -> flat metrics dict, in release order."""

  def __init__(self):
    self.metrics: dict[int, dict[str, Any]] = {}

  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    _check_round_num(round_num)
    self.metrics[int(round_num)] = flatten_metrics(metrics)

  def clear_metrics(self, round_num: int) -> None:
    _check_round_num(round_num)
    self.metrics = {r: m for r, m in self.metrics.items() if r < round_num}


class JSONLMetricsManager(MetricsManager):
  """Appends one JSON object a round to `path`: `{"round_num": r, "<flat key>": value, ...}`.

  Non-finite floats are written as `NaN`/`Infinity`, which Python's `json` reads back.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)

  @property
  def path(self) -> str:
    return self._path

  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    _check_round_num(round_num)
    row = {ROUND_KEY: int(round_num), **_without_round_key(flatten_metrics(metrics))}
    os.makedirs(os.path.dirname(os.path.abspath(self._path)), exist_ok=True)
    with open(self._path, 'a', encoding='utf-8') as f:
      f.write(json.dumps(row) + '\n')

  def clear_metrics(self, round_num: int) -> None:
    _check_round_num(round_num)
    if not os.path.exists(self._path):
      return
    kept = [row for row in _read_jsonl(self._path) if row[ROUND_KEY] < round_num]
    _files.atomic_write(self._path, ''.join(json.dumps(row) + '\n' for row in kept).encode())


class CSVMetricsManager(MetricsManager):
  """Writes one row a round to `path`, columns `round_num` and then the flat metric keys.

  When a round brings keys no earlier round had (e.g. the first evaluation), the header grows
  and the file is rewritten with the new columns (empty in older rows), as TFF's CSV managers
  do; otherwise a row is appended. Rewrites are atomic.
  """

  def __init__(self, path: str | os.PathLike):
    self._path = os.fspath(path)
    self._fieldnames: list[str] = []
    if os.path.exists(self._path):
      with open(self._path, newline='', encoding='utf-8') as f:
        header = next(csv.reader(f), [])
      self._fieldnames = [k for k in header if k != ROUND_KEY]

  @property
  def path(self) -> str:
    return self._path

  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    _check_round_num(round_num)
    flat = _without_round_key(flatten_metrics(metrics))
    new_keys = [k for k in flat if k not in self._fieldnames]
    if new_keys or not os.path.exists(self._path):
      rows = self._read_rows() if os.path.exists(self._path) else []
      self._fieldnames += new_keys
      self._rewrite(rows)
    with open(self._path, 'a', newline='', encoding='utf-8') as f:
      self._writer(f).writerow({ROUND_KEY: int(round_num), **flat})

  def clear_metrics(self, round_num: int) -> None:
    _check_round_num(round_num)
    if not os.path.exists(self._path):
      return
    rows = [row for row in self._read_rows() if int(row[ROUND_KEY]) < round_num]
    # Columns no kept row uses go too, so later rounds add them back in the same order.
    self._fieldnames = [k for k in self._fieldnames if any(row.get(k) for row in rows)]
    self._rewrite(rows)

  def _writer(self, f) -> csv.DictWriter:
    return csv.DictWriter(f, [ROUND_KEY, *self._fieldnames], restval='', extrasaction='raise')

  def _read_rows(self) -> list[dict[str, str]]:
    """The complete rows; a row cut short by a crash mid-write (the last one) is dropped."""
    with open(self._path, newline='', encoding='utf-8') as f:
      rows = list(csv.DictReader(f))
    width = len(self._fieldnames) + 1
    return [
      {k: v for k, v in row.items() if k is not None}
      for row in rows
      if len([v for v in row.values() if v is not None]) == width and row[ROUND_KEY].isdigit()
    ]

  def _rewrite(self, rows: list[dict[str, str]]) -> None:
    buffer = io.StringIO(newline='')
    writer = self._writer(buffer)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: v for k, v in row.items() if k == ROUND_KEY or k in self._fieldnames})
    _files.atomic_write(self._path, buffer.getvalue().encode('utf-8'))


class TensorBoardMetricsManager(MetricsManager):
  """Writes numeric metrics as TensorBoard scalars (tag = flat key, step = round) to `log_dir`.

  Needs tensorboardX (`pip install 'fedjax_lite[tensorboard]'`). `clear_metrics(r)` starts a new
  event file that tells TensorBoard to purge steps >= r from the older files (TensorBoard's
  `purge_step`), so a resumed run shows one clean curve.
  """

  def __init__(self, log_dir: str | os.PathLike):
    try:
      import tensorboardX
    except ImportError as e:
      raise ImportError(
        'TensorBoardMetricsManager needs tensorboardX. Tip: pip install "fedjax_lite[tensorboard]"'
      ) from e
    self._summary_writer_cls = tensorboardX.SummaryWriter
    self._log_dir = os.fspath(log_dir)
    self._writer = None
    self._purge_step: int | None = None

  @property
  def log_dir(self) -> str:
    return self._log_dir

  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    _check_round_num(round_num)
    if self._writer is None:
      # File names carry whole seconds; a nanosecond suffix keeps two writers opened within
      # one second apart and in creation order (TensorBoard reads files in name order).
      self._writer = self._summary_writer_cls(
        self._log_dir, purge_step=self._purge_step, filename_suffix=f'.{time.time_ns()}'
      )
    for key, value in flatten_metrics(metrics).items():
      if isinstance(value, bool | int | float):
        self._writer.add_scalar(key, float(value), global_step=int(round_num))
    self._writer.flush()

  def clear_metrics(self, round_num: int) -> None:
    _check_round_num(round_num)
    self.close()
    self._purge_step = int(round_num)

  def close(self) -> None:
    if self._writer is not None:
      self._writer.close()
      self._writer = None


def _without_round_key(flat: dict[str, Any]) -> dict[str, Any]:
  if ROUND_KEY in flat:
    raise ValueError(f'metrics must not have a top-level {ROUND_KEY!r} key; it names the round')
  return flat


def _read_jsonl(path: str) -> list[dict[str, Any]]:
  """The rows of a JSON Lines metrics file; a line cut short by a crash (the last) is dropped."""
  rows = []
  with open(path, encoding='utf-8') as f:
    lines = f.read().splitlines()
  for i, line in enumerate(lines):
    if not line.strip():
      continue
    try:
      row = json.loads(line)
    except json.JSONDecodeError:
      if i == len(lines) - 1:
        break
      raise ValueError(f'{path} line {i + 1} is not JSON: {line[:80]!r}') from None
    rows.append(row)
  return rows


def _parse_csv_value(text: str) -> Any:
  if text in ('True', 'False'):
    return text == 'True'
  for parse in (int, float):
    try:
      return parse(text)
    except ValueError:
      pass
  return text


def load_metrics(path: str | os.PathLike) -> dict[int, dict[str, Any]]:
  """Reads a metrics file written by `JSONLMetricsManager` (`.jsonl`) or `CSVMetricsManager`.

  Returns:
    round_num -> flat metrics, rounds ascending; CSV cells are parsed back to int, float or bool
    and empty cells (keys a round did not have) left out.
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'no metrics file at {path}')
  if path.endswith('.csv'):
    with open(path, newline='', encoding='utf-8') as f:
      rows = [
        {k: _parse_csv_value(v) for k, v in row.items() if k is not None and v}
        for row in csv.DictReader(f)
      ]
  else:
    rows = _read_jsonl(path)
  result = {}
  for row in rows:
    if not isinstance(row.get(ROUND_KEY), int):
      raise ValueError(f'{path}: a row has no integer {ROUND_KEY!r}: {row}')
    result[row.pop(ROUND_KEY)] = row
  return dict(sorted(result.items()))
