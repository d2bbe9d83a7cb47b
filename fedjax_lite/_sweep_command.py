"""`fedjax-lite sweep`: a grid of `train` settings run as few compiled programs as it can.

A sweep file is `train`'s TOML where any setting may be a list: the grid is every combination.
Settings that live in the process state (`_config.in_program()`: learning rates, FedProx's
strength, any entry's setting declared with an `hparam`; and the seed) vary inside one program,
`fl.templates.build_sweep`; configurations that differ in anything else (the model, the
algorithm, the data) are separate programs, grouped automatically.
Each run writes an ordinary run folder (`fedjax-lite eval` and `plot` take it);
the sweep folder gets `summary.json` (final and best test metrics and the final training loss:
per-seed values, mean and sample std over seeds, the split of each; strict JSON, described in
the file itself) and `comparison.png` (test accuracy against round, a line per configuration,
± the sample std over seeds as a band, and a loss panel). `fedjax-lite plot SWEEP_DIR
--metric NAME` draws the comparison of any metric again from the run folders.
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
from fedjax_lite._config import ConfigError

SUMMARY_FILE = 'summary.json'
CHECKPOINT_DIR = 'checkpoints'  # in each run folder, as `train` and `run_sweep` write it
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
  and the in-program settings the algorithm holds as hyperparameters."""
  in_program = _config.in_program()
  structural: dict[str, list[int]] = {}
  for i, config in enumerate(configs):
    key = {k: v for k, v in config.items() if k not in in_program and k != 'seed'}
    structural.setdefault(json.dumps(key, sort_keys=True), []).append(i)
  groups = []
  for indices in structural.values():
    process = experiment_fn(configs[indices[0]]).process
    hparams = process.get_hparams(process.initialize())
    outside = [k for k, path in in_program.items() if not _has(hparams, path)]
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
) -> list[Any]:
  """Runs configurations that differ only in the seed and in-program settings as one sweep;
  returns the final state of each run.

  Raises:
    ConfigError: some run folders hold checkpoints and others none (values added to a grid
      that ran), so the runs of one program cannot start from one round; the tip says how.
  """
  experiments = {}
  for config in configs:
    if config['seed'] not in experiments:
      experiments[config['seed']] = experiment_fn(config)
  first = experiments[configs[0]['seed']]
  held = first.process.get_hparams(first.process.initialize())
  in_program = {name: path for name, path in _config.in_program().items() if _has(held, path)}
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

  try:
    return _run_sweep(sweep, selection, configs, run_dirs, experiments, runs_per_program, progress)
  except ValueError:
    started = [_has_checkpoint(d) for d in run_dirs]
    if runs_per_program == 1 or all(started) or not any(started):
      raise
    new = [os.path.basename(d) for d, s in zip(run_dirs, started, strict=True) if not s]
    raise ConfigError(
      f'{", ".join(new)} hold no checkpoint while the other runs of their program do (values '
      'added to a grid that ran?), and the runs of one program advance together from one '
      'round; nothing was trained. Tip: rerun with --runs-per-program 1: each run is then a '
      'program of its own, so the new runs start from round 0 and the others resume (or pass '
      '--out NEW_DIR for a new sweep)'
    ) from None


def _has_checkpoint(run_dir: str) -> bool:
  checkpoints = simulation.FileCheckpointManager(os.path.join(run_dir, CHECKPOINT_DIR))
  return checkpoints.latest_readable_round() is not None


def _run_sweep(sweep, selection, configs, run_dirs, experiments, runs_per_program, progress):
  config = configs[0]
  first = experiments[config['seed']]
  stores, cohort_ids_fn = None, None
  if first.process.initial_client_state is not None:  # e.g. SCAFFOLD: a store per run folder
    for run_dir in run_dirs:
      os.makedirs(run_dir, exist_ok=True)
    stores = [
      simulation.SQLiteClientStateStore(
        os.path.join(run_dir, _config.CLIENT_STATES_FILE), first.process.initial_client_state
      )
      for run_dir in run_dirs
    ]
    seeds = [c['seed'] for c in configs]
    if len(set(seeds)) == 1:  # one cohort for every run, as `selection` gives it
      cohort_ids_fn = first.cohort_ids_fn
    else:  # each run its own seed's cohort
      cohort_ids_fn = lambda round_num: [experiments[s].cohort_ids_fn(round_num) for s in seeds]
  try:
    return simulation.run_sweep(
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
      # DP: each run's ε (its own accountant), each stopped at the budget as `train` stops it.
      privacy_accountant=[experiments[c['seed']].privacy_accountant for c in configs],
      epsilon_budget=config['epsilon_budget'],
      client_state_stores=stores,
      cohort_ids_fn=cohort_ids_fn,
      vectorized_evaluation=True,  # one compiled evaluation of each program's runs
    )
  finally:
    for store in stores or ():
      store.close()


# What each summary value is: name -> (metric key, the split it is measured on, statistic).
SUMMARY_METRICS = {
  'final_accuracy': ('evaluation/accuracy', 'test', 'last'),
  'best_accuracy': ('evaluation/accuracy', 'test', 'max'),
  'final_loss': ('evaluation/loss', 'test', 'last'),
  'final_train_loss': ('client_work/train/loss', 'train', 'last'),
  'final_epsilon': ('privacy/epsilon', 'train', 'last'),
}
STATISTICS = {
  'last': 'the value at the last round that has one',
  'max': 'the largest value over the rounds (the first round that reached it)',
}
SPLITS = {
  'test': "the held-out test data (the command's evaluation)",
  'train': "the round's training clients (ε: the privacy of the training data)",
}
STD = (
  "sample standard deviation over the configuration's seeds (ddof=1, as papers report); null "
  'with one seed, where there is no spread to estimate'
)
NULL = (
  'null stands for a value that is not finite (NaN or infinity: a diverged run; a mean or std '
  'over one) or undefined (a training metric of a round to which no client contributed)'
)


def configurations(configs: Sequence[Mapping[str, Any]], varying: Sequence[str]) -> dict:
  """`configuration name -> indices of its runs`: runs equal but for the seed, in grid order."""
  by_config: dict[str, list[int]] = {}
  settings = [v for v in varying if v != 'seed']
  for i, config in enumerate(configs):
    by_config.setdefault(run_name(config, settings), []).append(i)
  return by_config


def metric_series(rows: Mapping[int, Mapping[str, Any]], key: str) -> dict[int, float]:
  """`round -> value` of metric `key` in a run's metrics (`load_metrics`). A metric of a round
  whose `num_examples` (its sibling key) is 0 is NaN: no client contributed, so it is undefined
  (the process reports 0)."""
  examples = key.rsplit('/', 1)[0] + '/num_examples'
  series = {}
  for round_num, metrics in rows.items():
    value = metrics.get(key)
    if isinstance(value, bool) or not isinstance(value, int | float):
      continue
    no_data = key != examples and metrics.get(examples) == 0
    series[round_num] = math.nan if no_data else float(value)
  return series


def _statistic(series: Mapping[int, float], statistic: str) -> tuple[float, int] | None:
  """`(value, round)` of `series` by `statistic` (`STATISTICS`), or None if it is empty."""
  if not series:
    return None
  finite = {r: v for r, v in series.items() if math.isfinite(v)}
  if statistic == 'last' or not finite:
    round_num = max(series)
    return series[round_num], round_num
  round_num = max(finite, key=finite.__getitem__)  # rounds ascend: the first to reach it
  return finite[round_num], round_num


def summarize(
  configs: Sequence[Mapping[str, Any]],
  run_dirs: Sequence[str],
  varying: Sequence[str],
  diverged: Sequence[int] = (),
) -> list[dict[str, Any]]:
  """One row per configuration (runs equal but for the seed): its `seeds` and `runs` (folder
  names, in the same order), the runs that `diverged` (those of the indices `diverged`, e.g.
  with non-finite weights, and those whose last test loss is not finite), and for each of
  `SUMMARY_METRICS` the runs have: `values` (one per seed), the `rounds` they come from, their
  `mean` and `std` (sample std, ddof=1; None with one seed). Non-finite values stay NaN here;
  `write_summary` writes them as null."""
  rows = []
  for name, indices in configurations(configs, varying).items():
    runs = [os.path.basename(os.path.normpath(run_dirs[i])) for i in indices]
    row: dict[str, Any] = {
      'configuration': name,
      'seeds': [configs[i]['seed'] for i in indices],
      'runs': runs,
    }
    metrics = [simulation.load_metrics(os.path.join(run_dirs[i], 'metrics.jsonl')) for i in indices]
    bad = {runs[k] for k, i in enumerate(indices) if i in set(diverged)}
    for label, (key, _, statistic) in SUMMARY_METRICS.items():
      picked = [_statistic(metric_series(m, key), statistic) for m in metrics]
      if all(p is None for p in picked):
        continue
      values = [math.nan if p is None else p[0] for p in picked]
      row[label] = {
        'mean': float(np.mean(values)),
        'std': float(np.std(values, ddof=1)) if len(values) > 1 else None,
        'values': values,
        'rounds': [None if p is None else p[1] for p in picked],
      }
      if label == 'final_loss':
        bad |= {runs[k] for k, p in enumerate(picked) if p is not None and not math.isfinite(p[0])}
    row['diverged'] = [run for run in runs if run in bad]
    rows.append(row)
  return rows


def _cell(value: Mapping[str, Any]) -> str:
  """`mean ± std`, or `mean` with one seed (no spread); `nan` for what is not finite."""
  text = f'{value["mean"]:.4f}'
  return text if value['std'] is None else f'{text} ± {value["std"]:.4f}'


def format_summary(rows: Sequence[Mapping[str, Any]]) -> str:
  """The summary as a text table, `mean ± std` per metric (the split in its header), with a
  line saying what ± is."""
  labels = [label for label in SUMMARY_METRICS if any(label in row for row in rows)]
  header = ['configuration', 'seeds', *(f'{x} ({SUMMARY_METRICS[x][1]})' for x in labels)]
  lines = [header]
  for row in rows:
    cells = [row['configuration'], str(len(row['seeds']))]
    cells += [_cell(row[label]) if label in row else '-' for label in labels]
    lines.append(cells)
  widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
  text = ['  '.join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
  text.insert(1, '-' * len(text[0]))
  text.append(
    'mean ± sample std over seeds (ddof=1; one seed: no std); nan: diverged, or no client '
    'contributed'
  )
  return '\n'.join(line.rstrip() for line in text)


def _strict(value: Any) -> Any:
  """`value` with every non-finite float as None (strict JSON has no NaN or Infinity)."""
  if isinstance(value, float):
    return value if math.isfinite(value) else None
  if isinstance(value, Mapping):
    return {k: _strict(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return [_strict(v) for v in value]
  return value


def write_summary(path: str, rows: Sequence[Mapping[str, Any]]) -> None:
  """Writes `summary.json`, strict JSON that says what it holds: `std` and `null` (what they
  mean), `metrics` (each summary value's metric key, split and statistic) and
  `configurations` (the rows of `summarize`)."""
  labels = [label for label in SUMMARY_METRICS if any(label in row for row in rows)]
  document = {
    'std': STD,
    'null': NULL,
    'metrics': {
      label: {
        'key': SUMMARY_METRICS[label][0],
        'split': SUMMARY_METRICS[label][1],
        'statistic': STATISTICS[SUMMARY_METRICS[label][2]],
      }
      for label in labels
    },
    'splits': {split: SPLITS[split] for split in sorted({SUMMARY_METRICS[x][1] for x in labels})},
    'configurations': list(rows),
  }
  with open(path, 'w') as f:
    json.dump(_strict(document), f, indent=1, allow_nan=False)
    f.write('\n')


def diverged_runs(rows: Sequence[Mapping[str, Any]]) -> list[str]:
  """The names of the runs that diverged, over every configuration of the summary."""
  return [run for row in rows for run in row['diverged']]


_LOSSES = ('evaluation/loss', 'client_work/train/loss')


def comparison_figure(
  configs: Sequence[Mapping[str, Any]],
  run_dirs: Sequence[str],
  varying: Sequence[str],
  metric: str = _ACCURACY,
  title: str = '',
):
  """The comparison figure (a matplotlib `Figure` on the Agg canvas), or None when no run has
  `metric`: `metric` against round, one line per configuration (the mean over its seeds) with a
  band of ± the sample std (ddof=1, as in the summary) where it has two seeds or more, over the
  rounds every seed has; unless `metric` is a loss, a second panel of the test loss (solid) and
  the training loss (dashed). Round ticks are integers.

  Raises:
    ImportError: without matplotlib.
  """
  from matplotlib.backends import backend_agg
  from matplotlib.figure import Figure
  from matplotlib.ticker import MaxNLocator

  panels = [(metric,)] if metric in _LOSSES else [(metric,), _LOSSES]
  runs = [simulation.load_metrics(os.path.join(d, 'metrics.jsonl')) for d in run_dirs]
  if not any(metric_series(rows, metric) for rows in runs):
    return None
  figure = Figure(figsize=(5.5 * len(panels), 4.5), dpi=100)
  backend_agg.FigureCanvasAgg(figure)
  for number, keys in enumerate(panels):
    axes = figure.add_subplot(1, len(panels), number + 1)
    for color, (name, indices) in enumerate(configurations(configs, varying).items()):
      for style, key in zip(('-', '--'), keys, strict=False):
        curves = [metric_series(runs[i], key) for i in indices]
        rounds = sorted(set.intersection(*(set(c) for c in curves)))
        if not rounds:
          continue
        values = np.array([[c[r] for r in rounds] for c in curves])
        mean = values.mean(0)
        seeds = f'{len(indices)} seed{"s" * (len(indices) > 1)}'
        axes.plot(
          rounds,
          mean,
          style,
          marker='.',
          color=f'C{color}',
          label=f'{name} ({seeds})' if style == '-' else None,
        )
        if len(indices) > 1:
          std = values.std(0, ddof=1)
          axes.fill_between(rounds, mean - std, mean + std, color=f'C{color}', alpha=0.2)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_xlabel('round')
    names = [_label(key) for key in keys]
    axes.set_ylabel(' (solid), '.join(names) + (' (dashed)' if len(names) > 1 else ''))
    axes.grid(alpha=0.3)
    if number == 0 and axes.get_legend_handles_labels()[0]:
      axes.legend(fontsize='small')
  band = (
    'band: ± sample std over seeds'
    if any(len(i) > 1 for i in configurations(configs, varying).values())
    else ''
  )
  figure.suptitle('; '.join(x for x in (title, _label(metric), band) if x))
  figure.tight_layout()
  return figure


def _label(key: str) -> str:
  """A metric key as words: `evaluation/accuracy` -> test accuracy."""
  for prefix, split in (('evaluation/', 'test '), ('client_work/train/', 'train ')):
    if key.startswith(prefix):
      return split + key[len(prefix) :]
  return 'epsilon' if key == 'privacy/epsilon' else key


def plot(
  configs: Sequence[Mapping[str, Any]],
  run_dirs: Sequence[str],
  varying: Sequence[str],
  path: str,
  metric: str = _ACCURACY,
) -> bool:
  """Writes the comparison plot (`comparison_figure`) to `path`; False (nothing written)
  without matplotlib or values of `metric`."""
  try:
    figure = comparison_figure(
      configs, run_dirs, varying, metric, os.path.basename(os.path.dirname(os.path.abspath(path)))
    )
  except ImportError:
    return False
  if figure is None:
    return False
  figure.savefig(path, format='png')
  return True


def is_sweep(folder: str) -> bool:
  """Whether `folder` is a sweep folder: no metrics of its own, run folders inside."""
  if not os.path.isdir(folder) or os.path.exists(os.path.join(folder, 'metrics.jsonl')):
    return False
  return bool(_run_folders(folder))


def _run_folders(folder: str) -> list[str]:
  return sorted(
    path
    for path in (os.path.join(folder, name) for name in os.listdir(folder))
    if os.path.isfile(os.path.join(path, 'config.json'))
    and os.path.isfile(os.path.join(path, 'metrics.jsonl'))
  )


def read_sweep(folder: str) -> tuple[list[dict[str, Any]], list[str], list[str]]:
  """`(configs, run_dirs, varying)` of the run folders in a sweep folder, from their
  `config.json` (the settings that differ between them vary)."""
  run_dirs = _run_folders(folder)
  configs = []
  for run_dir in run_dirs:
    with open(os.path.join(run_dir, 'config.json')) as f:
      try:
        configs.append(json.load(f))
      except json.JSONDecodeError as error:
        raise ValueError(f'{run_dir}/config.json is damaged ({error})') from None
  keys = list(dict.fromkeys(k for c in configs for k in c))
  varying = [k for k in keys if len({json.dumps(c.get(k)) for c in configs}) > 1]
  return configs, run_dirs, varying


def resolve_metric(metric: str, run_dirs: Sequence[str]) -> str:
  """The metric key `metric` names in the runs' metrics: itself, or a short name (`accuracy`,
  `loss`, `epsilon`) as a test, then training, then privacy metric.

  Raises:
    LookupError: no run has such a metric.
  """
  keys = list(
    dict.fromkeys(
      k
      for d in run_dirs
      for rows in [simulation.load_metrics(os.path.join(d, 'metrics.jsonl'))]
      for m in rows.values()
      for k in m
    )
  )
  if metric in keys:
    return metric
  for prefix in ('evaluation/', 'client_work/train/', 'privacy/'):
    if prefix + metric in keys:
      return prefix + metric
  named = [k for k in keys if k.rsplit('/', 1)[-1] == metric and not k.startswith('timing/')]
  if named:
    return named[0]
  plottable = [k for k in keys if not k.startswith(('timing/', 'memory/'))]
  raise LookupError(f'no metric {metric!r}; the metrics are {", ".join(plottable)}')


def plot_sweep(folder: str, out_dir: str | None = None, metric: str | None = None) -> list[str]:
  """`fedjax-lite plot SWEEP_DIR`: the comparison plot of the run folders in `folder` for
  `metric` (default test accuracy) in `out_dir` (default `folder`): `comparison.png`, or
  `comparison-<metric>.png` for another metric. Returns the paths written."""
  configs, run_dirs, varying = read_sweep(folder)
  key = _ACCURACY if metric is None else resolve_metric(metric, run_dirs)
  name = PLOT_FILE if metric is None else f'comparison-{key.replace("/", "-")}.png'
  out_dir = folder if out_dir is None else out_dir
  os.makedirs(out_dir, exist_ok=True)
  figure = comparison_figure(
    configs, run_dirs, varying, key, os.path.basename(os.path.abspath(folder))
  )
  if figure is None:
    raise ValueError(f'{folder}: no run has values of {key} to plot')
  path = os.path.join(out_dir, name)
  figure.savefig(path, format='png')
  return [path]
