"""`plot_run`: PNG curves of a run's metrics file (loss, accuracy and, for a DP run, ε against
round; or any one metric).

Needs matplotlib (`pip install 'fedjax_lite[plot]'`). Figures are drawn on matplotlib's Agg
canvas directly, so plotting never changes the user's pyplot backend.
"""

from __future__ import annotations

import os
from typing import Any

from fedjax_lite.simulation import _metrics_managers

METRICS_FILES = ('metrics.jsonl', 'metrics.csv')
# The same in every figure.
_COLORS = {'train': 'tab:blue', 'eval': 'tab:orange', 'privacy': 'tab:green', 'other': 'tab:gray'}
EPSILON_KEY = 'privacy/epsilon'  # what the training loop releases with a privacy accountant


def _metrics_file(run_dir_or_metrics_file: str) -> str:
  if os.path.isdir(run_dir_or_metrics_file):
    for name in METRICS_FILES:
      path = os.path.join(run_dir_or_metrics_file, name)
      if os.path.isfile(path):
        return path
    raise FileNotFoundError(
      f'run_dir_or_metrics_file {run_dir_or_metrics_file!r} is a folder without '
      f'{" or ".join(METRICS_FILES)}'
    )
  if not os.path.isfile(run_dir_or_metrics_file):
    raise FileNotFoundError(f'run_dir_or_metrics_file {run_dir_or_metrics_file!r} does not exist')
  return run_dir_or_metrics_file


def _pick(keys: list[str], metric: str, evaluation: bool) -> str | None:
  """The key of a train (process) or evaluation metric named `metric`; TFF's names first."""
  preferred = f'evaluation/{metric}' if evaluation else f'client_work/train/{metric}'
  if preferred in keys:
    return preferred
  for key in keys:
    is_eval = key.startswith('evaluation/')
    if is_eval == evaluation and not key.startswith('timing/') and key.split('/')[-1] == metric:
      return key
  return None


def _curve(rows: dict[int, dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
  points = [(r, m[key]) for r, m in rows.items() if isinstance(m.get(key), int | float)]
  return [r for r, _ in points], [float(v) for _, v in points]


def _kind(key: str) -> str:
  if key.startswith('evaluation/'):
    return 'eval'
  if key.startswith('privacy/'):
    return 'privacy'
  return 'train' if '/train/' in f'/{key}' else 'other'


def _metric_curves(keys: list[str], metric: str) -> list[tuple[str, str]]:
  """`(key, kind)` of the curves of `metric`: the key itself, or the train and evaluation (and
  privacy) metrics of that name."""
  if metric in keys:
    return [(metric, _kind(metric))]
  named = [_pick(keys, metric, False), _pick(keys, metric, True), f'privacy/{metric}']
  found = [(key, _kind(key)) for key in dict.fromkeys(named) if key in keys]
  if not found:
    plottable = [k for k in keys if not k.startswith(('timing/', 'memory/'))]
    raise LookupError(f'no metric {metric!r}; the metrics are {", ".join(plottable)}')
  return found


def plot_run(
  run_dir_or_metrics_file: str | os.PathLike,
  out_dir: str | os.PathLike | None = None,
  *,
  metric: str | None = None,
):
  """Writes `loss.png` (train loss, and evaluation loss if any), `accuracy.png` (evaluation
  accuracy, and train accuracy if any) and, for a DP run (metrics with `privacy/epsilon`),
  `epsilon.png` (ε against round), titled with the run folder's name; train curves are blue,
  evaluation curves orange, ε green. Rounds are integer ticks.

  Args:
    run_dir_or_metrics_file: a run folder holding `metrics.jsonl` (preferred) or `metrics.csv`,
      or one such file.
    out_dir: where to write the PNGs (created if needed); default the run folder (the metrics
      file's folder).
    metric: plot only this metric, to `<metric>.png` (`/` as `-`): a flat key
      (`evaluation/loss`), or a name whose train, evaluation and privacy metrics are drawn
      (`loss`, `epsilon`).

  Returns:
    The paths of the PNG files written (a figure with no curve to draw is skipped).

  Raises:
    FileNotFoundError: no metrics file.
    LookupError: the metrics have no `metric`.
    ValueError: the file is damaged, or holds no value to plot.
  """
  try:
    from matplotlib import ticker
    from matplotlib.backends import backend_agg
    from matplotlib.figure import Figure
  except ImportError as e:
    raise ImportError('plot_run needs matplotlib. Tip: pip install "fedjax_lite[plot]"') from e
  path = _metrics_file(os.fspath(run_dir_or_metrics_file))
  rows = _metrics_managers.load_metrics(path)
  keys = list(dict.fromkeys(k for metrics in rows.values() for k in metrics))
  out_dir = os.path.dirname(os.path.abspath(path)) if out_dir is None else os.fspath(out_dir)
  figures = [
    (
      'loss.png',
      'loss',
      [(_pick(keys, 'loss', False), 'train'), (_pick(keys, 'loss', True), 'eval')],
    ),
    (
      'accuracy.png',
      'accuracy',
      [(_pick(keys, 'accuracy', True), 'eval'), (_pick(keys, 'accuracy', False), 'train')],
    ),
    ('epsilon.png', 'epsilon', [(EPSILON_KEY if EPSILON_KEY in keys else None, 'privacy')]),
  ]
  if metric is not None:
    figures = [(f'{metric.replace("/", "-")}.png', metric, _metric_curves(keys, metric))]
  run_name = os.path.basename(os.path.dirname(os.path.abspath(path)))
  written = []
  for filename, ylabel, curves in figures:
    curves = [(key, label, _curve(rows, key)) for key, label in curves if key is not None]
    curves = [(key, label, points) for key, label, points in curves if points[0]]
    if not curves:
      continue
    figure = Figure(figsize=(6, 4), dpi=100)
    backend_agg.FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for key, label, points in curves:
      axes.plot(*points, marker='.', color=_COLORS[label], label=f'{label} ({key})')
    axes.set_title(f'{run_name}: {ylabel}')
    axes.xaxis.set_major_locator(ticker.MaxNLocator(integer=True))
    axes.set_xlabel('round')
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    os.makedirs(out_dir, exist_ok=True)
    out_path = os.path.join(out_dir, filename)
    figure.savefig(out_path, format='png')
    written.append(out_path)
  if not written:
    what = 'loss or accuracy' if metric is None else repr(metric)
    raise ValueError(f'{path} has no {what} values to plot ({len(rows)} rows; keys {keys})')
  return written
