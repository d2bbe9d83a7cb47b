"""What every benchmark shares: the run's environment, timing, compiled-memory and RSS readings,
tables and JSON output."""

from __future__ import annotations

import datetime
import json
import os
import platform
import resource
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jaxlib
import numpy as np

import fedjax_lite as fl


def machine_load() -> dict:
  """Load average and (Linux) CPU pressure: how busy the machine was; figures vary with it."""
  load = {'loadavg': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}
  try:
    with open('/proc/pressure/cpu') as f:
      load['cpu_pressure'] = f.readline().strip()
  except OSError:
    pass
  return load


def environment(argv: Sequence[str] | None = None) -> dict:
  """Versions, devices and machine of this run, for the JSON's `meta`."""
  device = jax.devices()[0]
  return {
    'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
    'jax_version': jax.__version__,
    'jaxlib_version': jaxlib.__version__,
    'numpy_version': np.__version__,
    'fedjax_lite_version': fl.__version__,
    'backend': jax.default_backend(),
    'device_kind': device.device_kind,
    'device_count': jax.device_count(),
    'cpu_count': os.cpu_count(),
    'platform': platform.platform(),
    'python': platform.python_version(),
    'argv': sys.argv[1:] if argv is None else list(argv),
    'load_before': machine_load(),
  }


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
  """`(fn(), seconds)`, the result blocked until ready."""
  start = time.perf_counter()
  out = jax.block_until_ready(fn())
  return out, time.perf_counter() - start


def compiled_temp_bytes(process: fl.LearningProcess, batches_spec: fl.ClientBatches) -> int:
  """XLA's temporary bytes of `process.next` compiled for `batches_spec` (abstract shapes)."""
  state = jax.eval_shape(process.initialize)
  return int(process.next.lower(state, batches_spec).compile().memory_analysis().temp_size_in_bytes)


def peak_rss_bytes() -> int:
  """The peak resident set size of this process so far."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def format_table(columns: Sequence[tuple[str, str]], rows: Sequence[dict]) -> str:
  """A text table: `columns` are `(key, format spec)`; missing values print as '-'."""
  cells = [[key for key, _ in columns]]
  for row in rows:
    cells.append(
      [
        '-' if row.get(key) is None else format(row[key], spec) if spec else str(row[key])
        for key, spec in columns
      ]
    )
  widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
  lines = ['  '.join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
  lines.insert(1, '-' * len(lines[0]))
  return '\n'.join(lines)


def write_json(path: str, results: dict) -> None:
  """Writes `results` (with `meta['load_after']` added) to `path`, creating its folder."""
  results.setdefault('meta', {})['load_after'] = machine_load()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(results, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
  print(f'wrote {path}')
