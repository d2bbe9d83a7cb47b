"""`fedjax-lite sweep`: a grid of `train` settings run as few compiled programs as it can.

A sweep file is `train`'s TOML where any setting may be a list: the grid is every combination.
Settings that live in the process state (`IN_PROGRAM`: learning rates, FedProx's strength, the
seed) vary inside one program, `fl.templates.build_sweep`; configurations that differ in
anything else (the model, the algorithm, the data) are separate programs, grouped
automatically. Each run writes an ordinary run folder (`fedjax-lite eval` and `plot` take it);
the sweep folder gets a summary table (final and best test metrics, mean ± std over seeds) and a
comparison plot (test accuracy against round, a line per configuration, seeds as a band).
"""

from __future__ import annotations

import itertools
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_lite import _config, simulation, templates
from fedjax_lite._config import ConfigError, flag

# setting -> where it sits in `process.get_hparams(state)`.
IN_PROGRAM = {
  'client_lr': ('client_work', 'learning_rate'),
  'server_lr': ('finalizer', 'learning_rate'),
  'proximal_strength': ('client_work', 'proximal_strength'),
}
SUMMARY_FILE = 'summary.json'
PLOT_FILE = 'comparison.png'
_ACCURACY = 'evaluation/accuracy'


def read_grid(path: str) -> tuple[list[dict[str, Any]], list[str]]:
  """`(settings of every grid point, the names of the settings that vary)` of a sweep file."""
  axes = {}
  for name, (key, value) in _config.read_toml_table(path).items():
    values = value if isinstance(value, list) else [value]
    if not values:
      raise ConfigError(f'{path}: {key} is an empty list; give at least one value')
    axes[name] = [_config.parse_setting(name, v, f'{path}: {key}') for v in values]
  varying = [name for name, values in axes.items() if len(values) > 1]
  points = [dict(zip(axes, combo, strict=True)) for combo in itertools.product(*axes.values())]
  return points, varying


def run_name(settings: Mapping[str, Any], varying: Sequence[str]) -> str:
  """A run's folder name: its values of the varying settings, e.g. `client_lr=0.1,seed=1`."""
  return ','.join(f'{name}={settings[name]}' for name in varying) or 'run'


def _set(tree: dict, path: tuple[str, ...], value: Any) -> dict:
  if len(path) == 1:
    return {**tree, path[0]: value}
  return {**tree, path[0]: _set(tree.get(path[0], {}), path[1:], value)}


def _has(tree: Mapping, path: tuple[str, ...]) -> bool:
  for key in path:
    if not isinstance(tree, Mapping) or key not in tree:
      return False
    tree = tree[key]
  return True


def plan(configs: Sequence[dict[str, Any]], experiment_fn) -> list[list[int]]:
  """Groups of config indices that run as one program: equal in every setting except the seed
  and the `IN_PROGRAM` settings the algorithm holds as hyperparameters."""
  structural: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    key = {k: v for k, v in config.items() if k not in IN_PROGRAM and k != 'seed'}
    structural.setdefault(json.dumps(key, sort_keys=True), []).append(i)
  groups = []
  for indices in structural.values():
    experiment = experiment_fn(configs[indices[0]])
    process = experiment.process
    if getattr(process, 'initial_client_state', None) is not None:
      raise ConfigError(
        f'{flag("algorithm")} {configs[indices[0]]["algorithm"]} keeps per-client state, which '
        'sweeps do not carry yet; run each configuration with `fedjax-lite train`'
      )
    hparams = process.get_hparams(process.initialize())
    outside = [k for k, path in IN_PROGRAM.items() if not _has(hparams, path)]
    split: dict[str, list[int]] = {}
    for i in indices:
      key = json.dumps({k: configs[i][k] for k in outside})
      split.setdefault(key, []).append(i)
    groups.extend(split.values())
  return groups


def run_group(
  configs: Sequence[dict[str, Any]],
  run_dirs: Sequence[str],
  experiment_fn,
  *,
  runs_per_program: int | None,
  progress: bool,
) -> None:
  """Runs configurations that differ only in the seed and in-program settings as one sweep."""
  experiments = {}
  for config in configs:
    if config['seed'] not in experiments:
      experiments[config['seed']] = experiment_fn(config)
  first = experiments[configs[0]['seed']]
  held = first.process.get_hparams(first.process.initialize())
  in_program = {name: path for name, path in IN_PROGRAM.items() if _has(held, path)}
  runs = []
  for config in configs:
    hparams: dict = {}
    for name, path in in_program.items():
      hparams = _set(hparams, path, config[name])
    runs.append(templates.SweepRun(config['seed'], hparams))
  sweep = templates.build_sweep(lambda seed: experiments[seed].process, runs)
  seeds = [config['seed'] for config in configs]

  def selection(round_num: int):
    if len(set(seeds)) == 1:  # one population, one cohort: common random numbers
      return first.training_data_fn(round_num)
    by_seed = {seed: experiments[seed].training_data_fn(round_num) for seed in set(seeds)}
    return [by_seed[seed] for seed in seeds]  # each run its own seed's population and cohort

  config = configs[0]
  simulation.run_sweep(
    sweep,
    selection,
    config['rounds'],
    run_dirs,
    configs=configs,
    runs_per_program=runs_per_program,
    evaluation_fn=first.evaluation_fn,
    evaluation_selection_fn=lambda round_num: first.evaluation_data,
    rounds_per_evaluation=config['eval_every'],
    rounds_per_checkpoint=config['checkpoint_every'],
    keep=max(config['keep'], 2),
    progress=progress,
    resumable=_config.RESUMABLE,
  )


def summarize(
  configs: Sequence[dict[str, Any]], run_dirs: Sequence[str], varying: Sequence[str]
) -> list[dict[str, Any]]:
  """One row per configuration (runs equal but for the seed): the final and best test
  metrics and the final training loss, mean and std over its seeds."""
  by_config: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    key = run_name(config, [v for v in varying if v != 'seed'])
    by_config.setdefault(key, []).append(i)
  rows = []
  for name, indices in by_config.items():
    row: dict[str, Any] = {'configuration': name, 'seeds': len(indices)}
    series = [simulation.load_metrics(os.path.join(run_dirs[i], 'metrics.jsonl')) for i in indices]
    for label, pick in [
      ('final_accuracy', lambda rows: _last(rows, _ACCURACY)),
      ('best_accuracy', lambda rows: _best(rows, _ACCURACY)),
      ('final_loss', lambda rows: _last(rows, 'evaluation/loss')),
      ('final_train_loss', lambda rows: _last(rows, 'client_work/train/loss')),
    ]:
      values = [v for v in map(pick, series) if v is not None]
      if values:
        row[label] = float(np.mean(values))
        row[label + '_std'] = float(np.std(values))
    rows.append(row)
  return rows


def _last(rows: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
  values = [m[key] for _, m in sorted(rows.items()) if key in m]
  return values[-1] if values else None


def _best(rows: Mapping[int, Mapping[str, Any]], key: str) -> float | None:
  values = [m[key] for m in rows.values() if key in m]
  return max(values) if values else None


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
  """The summary as a text table, `mean ± std` per metric."""
  metrics = ['final_accuracy', 'best_accuracy', 'final_loss', 'final_train_loss']
  header = ['configuration', 'seeds', *metrics]
  lines = [header]
  for row in rows:
    cells = [row['configuration'], str(row['seeds'])]
    for metric in metrics:
      if metric in row:
        cells.append(f'{row[metric]:.4f} ± {row[metric + "_std"]:.4f}')
      else:
        cells.append('-')
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ['  '.join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
  text.insert(1, '-' * len(text[0]))
  return '\n'.join(text)


def plot(
  configs: Sequence[dict[str, Any]], run_dirs: Sequence[str], varying: Sequence[str], path: str
) -> bool:
  """Writes the comparison plot; False (nothing written) without matplotlib or test metrics."""
  try:
    from matplotlib.backends import backend_agg
    from matplotlib.figure import Figure
  except ImportError:
    return False
  figure = Figure(figsize=(7, 4.5), dpi=100)
  backend_agg.FigureCanvasAgg(figure)
  axes = figure.add_subplot()
  by_config: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    by_config.setdefault(run_name(config, [v for v in varying if v != 'seed']), []).append(i)
  drawn = False
  for color, (name, indices) in enumerate(by_config.items()):
    curves = []
    for i in indices:
      rows = simulation.load_metrics(os.path.join(run_dirs[i], 'metrics.jsonl'))
      curves.append(
        {r: m['evaluation/accuracy'] for r, m in rows.items() if 'evaluation/accuracy' in m}
      )
    rounds = sorted(set.intersection(*(set(c) for c in curves)))
    if not rounds:
      continue
    values = np.array([[c[r] for r in rounds] for c in curves])
    axes.plot(
      rounds, values.mean(0), marker='.', color=f'C{color}', label=f'{name} ({len(indices)} seeds)'
    )
    if len(indices) > 1:
      axes.fill_between(rounds, values.min(0), values.max(0), color=f'C{color}', alpha=0.2)
    drawn = True
  if not drawn:
    return False
  axes.set_title(f'{os.path.basename(os.path.dirname(os.path.abspath(path)))}: test accuracy')
  axes.set_xlabel('round')
  axes.set_ylabel('test accuracy (band: min-max over seeds)')
  axes.grid(alpha=0.3)
  axes.legend(fontsize='small')
  figure.tight_layout()
  figure.savefig(path, format='png')
  return True


def write_summary(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  with open(path, 'w') as f:
    json.dump(list(rows), f, indent=1)
    f.write('\n')


def check_finite(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The configurations whose final test loss is not finite (diverged)."""
  return [r['configuration'] for r in rows if not math.isfinite(r.get('final_loss', 0.0))]
