"""The `fedjax-lite` command: train, evaluate, list datasets, plot.

`fedjax-lite train` with no arguments trains FedAvg on the digits data split non-IID over 30
clients, writes metrics and checkpoints under `runs/`, and prints the final test accuracy.
Rerunning the same command after a kill resumes from the last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import math
import os
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

from fedjax_lite import _catalogue, _config, data, simulation
from fedjax_lite._config import ConfigError
from fedjax_lite.simulation import _runs as simulation_runs
from fedjax_lite.simulation import multihost

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
CLIENT_STATES_FILE = _config.CLIENT_STATES_FILE


class _PrintMetrics(simulation.MetricsManager):
  """One line per round on stdout (used when no progress bar is shown): the training metrics
  of the clients (`client_work/train/*`), the evaluation (`evaluation/*`), ε, seconds per round
  and throughput (compilation excluded: a round that compiled says how long it took instead of
  its examples/s) and the clients excluded as non-finite, whatever the algorithm reports.

  A training metric of a round in which no client contributed (`num_examples` 0, e.g. all
  excluded as non-finite) is undefined and shows as nan."""

  def __init__(self):
    self._compile = simulation.CompileTimer()

  def release(self, metrics: Mapping[str, Any], round_num: int) -> None:
    parts = [f'round {round_num:4d}']
    for prefix, label in [('client_work/train/', ''), ('evaluation/', 'test ')]:
      names = [k[len(prefix) :] for k in metrics if k.startswith(prefix)]
      names = [n for n in names if n != 'num_examples' and '/' not in n]
      no_data = metrics.get(prefix + 'num_examples') == 0
      for name in sorted(names, key=lambda n: (n != 'loss', n)):  # loss first
        value = math.nan if no_data else metrics[prefix + name]
        parts.append(f'{label}{name} {value:.4f}')
    if 'privacy/epsilon' in metrics:
      parts.append(f'epsilon {metrics["privacy/epsilon"]:.4f}')
    compiled = self._compile.take()
    if 'timing/round_seconds' in metrics:
      parts.append(f's/round {max(metrics["timing/round_seconds"] - compiled, 0.0):.3f}')
    if compiled >= 0.01:
      parts.append(f'compiled in {compiled:.2f} s')
    elif 'timing/examples_per_second' in metrics:
      parts.append(f'examples/s {metrics["timing/examples_per_second"]:.0f}')
    excluded = metrics.get('client_work/non_finite_clients')
    if excluded:
      parts.append(f'excluded {excluded:.0f} non-finite clients')
    if 'timing/tuning_seconds' in metrics:  # the first round a process runs
      chunk, seconds = metrics['layout/client_chunk_size'], metrics['timing/tuning_seconds']
      parts.append(f'client chunk {chunk:.0f} (chosen in {seconds:.1f} s)')
    print('  '.join(parts), flush=True)

  def close(self) -> None:
    self._compile.close()


def _read_run_config(path: str) -> dict[str, Any]:
  """A run folder's saved settings; a damaged file is a one-line error naming it."""
  try:
    return simulation_runs.read_settings(path)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def _run_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
  """The run folder and its settings: flags over `--config` over defaults, or the saved run's."""
  names = _config.option_names()
  flags = {k: v for k, v in vars(args).items() if k in names}
  file_settings = _config.read_toml(args.config) if args.config else {}
  config = _config.resolve(flags, file_settings)
  out = args.out or os.path.join('runs', _run_name(config))
  saved_path = os.path.join(out, CONFIG_FILE)
  if not os.path.exists(saved_path):
    if args.resume:
      raise ConfigError(f'--resume: {out} holds no run to resume ({saved_path} is missing)')
    given = {*flags, *file_settings}
    return out, _checked(_with_defaults(config, given), given)
  saved = _read_run_config(saved_path)
  # The saved settings, except those given now: a run is only extended by an explicit --rounds.
  config = {**config, **saved, **{k: config[k] for k in (*file_settings, *flags)}}
  changed = _config.differences(saved, config)
  if changed:
    raise ConfigError(
      f'{out} holds a run with other settings ({"; ".join(changed)}). Tip: pass --out NEW_DIR '
      'for a new run, or only the flags that may change on resume: '
      + ', '.join(_config.flag(k) for k in _config.RESUMABLE if k not in _config.pinned(saved))
    )
  return out, _checked(config, {*flags, *file_settings})


def _run_name(config: dict[str, Any]) -> str:
  """`DATASET-MODEL-ALGORITHM`, or `TASK-ALGORITHM` (import paths as `module.callable`)."""
  parts = [config['task']] if config['task'] else [config['dataset'], config['model']]
  return '-'.join(p.replace(':', '.') for p in [*parts, config['algorithm']])


def _distributed_run_config(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
  """`_run_config` of process 0, on every process (the other hosts need no run folder); only
  `--data-path` is each host's own. A refusal on process 0 is raised on every process."""
  settings = None
  if multihost.is_primary():
    try:
      settings = {'run': _run_config(args)}
    except ConfigError as error:
      settings = {'error': str(error)}
  settings = multihost.broadcast_json(settings)
  if 'error' in settings:
    raise ConfigError(settings['error'])
  out, config = settings['run']
  if 'data_path' in vars(args):  # given on this host
    config['data_path'] = args.data_path
  return out, config


def _with_defaults(config: dict[str, Any], given: set[str]) -> dict[str, Any]:
  """`_catalogue.with_defaults`, its refusals one-line errors."""
  try:
    return _catalogue.with_defaults(config, given)
  except ValueError as error:
    raise ConfigError(str(error)) from None


def _checked(config: dict[str, Any], given: set[str]) -> dict[str, Any]:
  """`config`, once every setting `given` is read by the entry it belongs to and the chosen
  entries' checks pass (`_catalogue.check_settings`)."""
  try:
    _catalogue.check_settings(config, given)
  except ValueError as error:
    raise ConfigError(str(error)) from None
  return config


def _train(args: argparse.Namespace) -> int:
  if args.processes > 1:
    return _launch_processes(args)
  if args.distributed:
    multihost.initialize()
  from fedjax_lite import _experiment  # builds models: imported only when training

  out, config = _distributed_run_config(args) if args.distributed else _run_config(args)
  experiment = _experiment.build_experiment(config, multihost=args.distributed)
  primary = not args.distributed or multihost.is_primary()  # the others write nothing
  with contextlib.ExitStack() as held:
    refusal = None
    if primary:
      try:
        held.enter_context(simulation.RunFolderLock(out))
      except simulation.RunFolderInUseError as error:
        refusal = f'--out: {error}'
    if args.distributed:  # every process stops, or none
      refusal = multihost.broadcast_json(refusal)
    if refusal:
      raise ConfigError(refusal)
    return _train_locked(args, out, config, experiment, primary=primary)


def _train_locked(args, out: str, config: dict[str, Any], experiment: Any, *, primary: bool) -> int:
  """Trains with the run folder held; in a multi-process run only the `primary` process writes
  checkpoints, metrics and lines (the others follow it: they resume from its checkpoint)."""
  checkpoints = simulation.FileCheckpointManager(
    os.path.join(out, CHECKPOINT_DIR), keep=config['keep'], metadata=config
  )
  process, quiet = experiment.process, args.quiet or not primary
  resumed = checkpoints.latest_readable_round() if primary else None
  if args.distributed:  # every process takes the primary's view, so all refuse or all go on
    resumed = int(multihost.broadcast_from_primary(np.int64(-1 if resumed is None else resumed)))
    resumed = None if resumed < 0 else resumed
    checkpoints = multihost.PrimaryCheckpointManager(checkpoints)
    process = multihost.local_metrics(process)
  if resumed is not None and resumed > config['rounds']:
    raise ConfigError(
      f'{_config.flag("rounds")}: {out} already holds round {resumed}, past '
      f'{config["rounds"]}; nothing was changed. Tip: pass --rounds {resumed} or more.'
    )
  managers = []
  if primary:
    # Written only once the settings are accepted, so a refused resume leaves the run as it was.
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, CONFIG_FILE), 'w') as f:
      json.dump(config, f, indent=1)
    managers = [
      simulation.CSVMetricsManager(os.path.join(out, 'metrics.csv')),
      simulation.JSONLMetricsManager(os.path.join(out, 'metrics.jsonl')),
    ]
    if config['tensorboard']:
      managers.append(simulation.TensorBoardMetricsManager(os.path.join(out, 'tensorboard')))
  progress = not quiet and sys.stdout.isatty()
  if not quiet and not progress:
    managers.append(_PrintMetrics())
  accountant = experiment.privacy_accountant
  budget = config['epsilon_budget']
  if not quiet:
    if resumed == config['rounds']:
      status = f' (finished at round {resumed}; pass --rounds N to extend it)'
    elif resumed and accountant is not None and budget and accountant.epsilon(resumed + 1) > budget:
      status = (
        f' (stopped at round {resumed} by the privacy budget: one more round takes epsilon past '
        f'{budget:g}; raise --epsilon-budget to extend it)'
      )
    elif resumed:
      status = f' (resuming after round {resumed})'
    else:
      status = ''
    print(
      f'{config["task"] or config["dataset"]}'
      f'{" (generated stand-in)" if config["stand_in"] else ""}: '
      f'{experiment.train_data.num_clients} clients, {config["clients_per_round"]} per round; '
      f'{"its model" if config["task"] else config["model"]} with {config["algorithm"]}; '
      f'writing to {out}{status}'
    )
  if accountant is not None and not quiet:
    print(
      f'privacy: epsilon at delta={accountant.target_delta:.3g} under {accountant.assumption}'
      + (
        f'; stopping before epsilon exceeds {config["epsilon_budget"]}'
        if config['epsilon_budget']
        else ''
      )
    )
  store = None
  if getattr(process, 'initial_client_state', None) is not None:  # e.g. SCAFFOLD
    open_store = lambda: simulation.SQLiteClientStateStore(
      os.path.join(out, CLIENT_STATES_FILE), process.initial_client_state
    )
    if args.distributed:  # process 0 holds the file; each round it broadcasts the cohort's states
      store = multihost.PrimaryClientStateStore(
        open_store, process.initial_client_state, config['clients_per_round']
      )
    else:
      store = open_store()
  start = time.perf_counter()
  compiling = simulation.CompileTimer()
  try:
    with data.Prefetcher(experiment.training_data_fn, stop=config['rounds'] + 1) as prefetch:
      state = simulation.run_training_process(
        process,
        prefetch,
        config['rounds'],
        evaluation_fn=experiment.evaluation_fn,
        evaluation_selection_fn=lambda round_num: experiment.evaluation_data,
        rounds_per_evaluation=config['eval_every'],
        checkpoint_manager=checkpoints,
        rounds_per_checkpoint=config['checkpoint_every'],
        metrics_managers=managers,
        progress=progress,
        privacy_accountant=accountant,
        epsilon_budget=config['epsilon_budget'],
        client_state_store=store,
        cohort_ids_fn=experiment.cohort_ids_fn if store is not None else None,
      )
  finally:
    compiling.close()
    for manager in managers:
      manager.close()
    if store is not None:
      store.close()
  rounds_run = max(checkpoints.checkpoint_rounds() or [0])  # the driver saves its last round
  final = simulation.flatten_metrics(experiment.evaluation_fn(state, experiment.evaluation_data))
  bad = _non_finite_leaves(multihost.to_host(experiment.process.get_model_weights(state)))
  bad += [f'test {k}' for k, v in final.items() if not np.isfinite(v)]
  if bad and not primary:
    return 1
  if bad:
    print(
      f'fedjax-lite train: error: the model diverged: after round {rounds_run} these are not '
      f'finite: {", ".join(bad[:4])}. Tip: lower --client-lr or --server-lr, or clip updates '
      f'with --aggregator clip. The checkpoints are in {out}',
      file=sys.stderr,
    )
    return 1
  if not primary:
    return 0
  scores = '  '.join(f'test {k} {v:.4f}' for k, v in final.items() if k != 'num_examples')
  if accountant is not None:
    scores += f'  epsilon {accountant.epsilon(rounds_run):.3f} after {rounds_run} rounds'
  seconds = f'{time.perf_counter() - start:.1f}s, {compiling.take():.1f}s of it compiling'
  print(f'final: {scores}  ({seconds}; metrics and checkpoints in {out})')
  return 0


# Fewer clients a round per process than this gained nothing measured (--processes' help).
MIN_CLIENTS_PER_PROCESS = 50


def _launch_processes(args: argparse.Namespace) -> int:
  """Runs this `train` command as `args.processes` processes of one multi-process run on this
  machine (`multihost.launch`); returns the first non-zero exit status (0 if all succeed)."""
  command = [sys.executable, '-m', 'fedjax_lite.cli', *_without_processes(args.argv)]
  try:
    multihost.check_num_processes(args.processes)
  except ValueError as error:
    raise ConfigError(f'--processes: {error}') from None
  note = _small_cohort_note(args)
  if note:
    print(f'fedjax-lite train: note: {note}', file=sys.stderr, flush=True)
  return multihost.launch([*command, '--distributed'], args.processes, name='fedjax-lite train')


def _small_cohort_note(args: argparse.Namespace) -> str | None:
  """Why `--processes` likely slows this run down, or None (also when the processes will refuse
  the settings: they say why)."""
  try:
    _, config = _run_config(args)
  except (ConfigError, OSError):
    return None
  cohort = config['clients_per_round']
  per_process = -(-cohort // args.processes)
  if per_process >= MIN_CLIENTS_PER_PROCESS:
    return None
  return (
    f'--processes {args.processes} leaves each process {per_process} of the {cohort} clients a '
    f'round; below {MIN_CLIENTS_PER_PROCESS} per process no gain was measured (the all-reduce '
    'and compiling outweigh the work), so one process is likely faster'
  )


def _without_processes(argv: Sequence[str]) -> list[str]:
  """`argv` without its `--processes N` (or `--processes=N`)."""
  out, skip = [], False
  for arg in argv:
    if skip:
      skip = False
    elif arg == '--processes':
      skip = True
    elif not arg.startswith('--processes='):
      out.append(arg)
  return out


def _non_finite_leaves(weights: Any) -> list[str]:
  """The paths of the leaves of `weights` that hold a NaN or an infinity."""
  flat = jax.tree_util.tree_flatten_with_path(jax.device_get(weights))[0]
  return [jax.tree_util.keystr(path) for path, leaf in flat if not np.all(np.isfinite(leaf))]


def _sweep(args: argparse.Namespace) -> int:
  from fedjax_lite import _experiment, _sweep_command

  points, varying = _sweep_command.read_grid(args.config)
  configs = []
  for point in points:
    config = _with_defaults(_config.resolve({}, point), set(point))
    configs.append(_checked(config, set(point)))
  out = args.out or os.path.join(
    'runs', 'sweep-' + os.path.splitext(os.path.basename(args.config))[0]
  )
  run_dirs = [os.path.join(out, _sweep_command.run_name(c, varying)) for c in configs]
  built: dict[str, Any] = {}

  def experiment_fn(config):  # one build per configuration (data, model, process)
    key = json.dumps(config, sort_keys=True)
    if key not in built:
      built[key] = _experiment.build_experiment(config)
    return built[key]

  groups = _sweep_command.plan(configs, experiment_fn)
  if not args.quiet:
    print(
      f'sweep of {len(configs)} runs ({", ".join(varying) or "one point"}) as '
      f'{len(groups)} program{"s" * (len(groups) > 1)}; writing to {out}'
    )
  progress = not args.quiet and sys.stdout.isatty()
  diverged = []
  for number, group in enumerate(groups, 1):
    if not args.quiet and not progress:
      names = ', '.join(_sweep_command.run_name(configs[i], varying) for i in group)
      print(f'program {number}/{len(groups)}: {names}', flush=True)
    start = time.perf_counter()
    try:
      with simulation.CompileTimer() as compiling:
        states = _sweep_command.run_group(
          [configs[i] for i in group],
          [run_dirs[i] for i in group],
          experiment_fn,
          runs_per_program=args.runs_per_program,
          progress=progress,
        )
    except simulation.RunFolderInUseError as error:
      raise ConfigError(f'--out: {error}') from None
    except ValueError as error:  # run folders that cannot resume these settings
      raise ConfigError(f'--out: {error}') from None
    process = experiment_fn(configs[group[0]]).process
    for i, state in zip(group, states, strict=True):
      if _non_finite_leaves(process.get_model_weights(state)):
        diverged.append(i)
    if not args.quiet:
      seconds = time.perf_counter() - start
      print(
        f'program {number}/{len(groups)} done in {seconds:.1f} s, {compiling.total:.1f} s of '
        'it compiling',
        flush=True,
      )
    accountant = experiment_fn(configs[group[0]]).privacy_accountant  # the program's runs share it
    if accountant is not None and not args.quiet:  # as `train` ends, for the program's runs
      checkpoints = simulation.FileCheckpointManager(
        os.path.join(run_dirs[group[0]], CHECKPOINT_DIR)
      )
      rounds_run = max(checkpoints.checkpoint_rounds() or [0])
      print(
        f'program {number}/{len(groups)}: epsilon {accountant.epsilon(rounds_run):.3f} after '
        f'{rounds_run} rounds at delta={accountant.target_delta:.3g} under {accountant.assumption}'
      )
  rows = _sweep_command.summarize(configs, run_dirs, varying, diverged)
  _sweep_command.write_summary(os.path.join(out, _sweep_command.SUMMARY_FILE), rows)
  plotted = _sweep_command.plot(
    configs, run_dirs, varying, os.path.join(out, _sweep_command.PLOT_FILE)
  )
  print(_sweep_command.format_summary(rows))
  print(
    f'summary in {os.path.join(out, _sweep_command.SUMMARY_FILE)}'
    + (f', plot in {os.path.join(out, _sweep_command.PLOT_FILE)}' if plotted else '')
  )
  diverged = _sweep_command.diverged_runs(rows)
  if diverged:
    print(
      f'fedjax-lite sweep: error: {len(diverged)} of {len(configs)} runs diverged (non-finite '
      f'weights or test loss): {", ".join(diverged)}. Tip: lower --client-lr or --server-lr, '
      f'or clip updates with --aggregator clip. Their folders are in {out}',
      file=sys.stderr,
    )
    return 1
  return 0


def _eval(args: argparse.Namespace) -> int:
  try:
    run = simulation.load_run(args.run_dir, args.round)
  except (FileNotFoundError, ValueError) as error:
    if isinstance(error, ConfigError):  # a saved setting the command refuses: says which
      raise
    flag = (
      '--round' if args.round is not None and 'no checkpoint of round' in str(error) else 'RUN_DIR'
    )
    raise ConfigError(f'{flag}: {error}') from None
  print(f'round {run.round_num} of {args.run_dir}')
  for key, value in run.evaluate().items():
    print(f'  {key} {value:.6g}')
  if args.personalize:
    _personalize(args, run)
  return 0


def _personalize(args: argparse.Namespace, run: Any) -> None:
  """Prints the personalization evaluation of `run`: per strategy (SGD fine-tuning for each of
  `--fine-tune-epochs`), its metrics on the clients' held-out halves beside the global model's
  (`baseline_metrics`), and the share of clients whose accuracy it raised."""
  from fedjax_lite import algorithms, optimizers

  lr = run.config['client_lr'] if args.fine_tune_lr is None else args.fine_tune_lr
  strategies = {
    f'sgd_{epochs}_epochs': algorithms.Personalization(optimizers.build_sgdm(lr), epochs)
    for epochs in args.fine_tune_epochs
  }
  try:
    out = run.evaluate_personalized(strategies, max_clients=args.personalize_clients)
  except ValueError as error:
    raise ConfigError(f'--personalize: {error}') from None
  metrics, per_client = jax.device_get((out.metrics, out.client_metrics))
  baseline = per_client['baseline_metrics']
  real = np.asarray(baseline['num_examples']) > 0
  print(
    f'personalization on {int(real.sum())} held-out clients (half of each fine-tunes by SGD at '
    f'lr {lr:g}, the other half tests):'
  )
  names = [k for k in metrics['baseline_metrics'] if k != 'num_examples']
  print(f'  {"strategy":<18}' + ''.join(f'{n:>12}' for n in names) + f'{"improved":>10}')
  for name, values in metrics.items():
    row = f'  {name:<18}' + ''.join(f'{float(values[n]):>12.4f}' for n in names)
    if name != 'baseline_metrics' and 'accuracy' in baseline:
      raised = per_client[name]['accuracy'][real] > baseline['accuracy'][real]
      row += f'{np.mean(raised):>10.0%}'
    print(row)


def _datasets(args: argparse.Namespace) -> int:
  print(f'{"name":<15} {"kind":<9} {"here":<4} description')
  for info in data.DATASETS.values():
    here = 'yes' if info.available(args.data_path) else 'no'
    print(f'{info.name:<15} {info.kind:<9} {here:<4} {info.description}')
    if here == 'no':
      print(f'{"":<30} to get it: {info.how_to_get}')
  print(f'\n{"task (--task)":<25} {"here":<4} description')
  for name in _catalogue.TASKS:
    task = _catalogue.TASKS[name].build()
    missing = task.missing(args.data_path)
    print(f'{name:<25} {"no" if missing else "yes":<4} {task.description}')
    for line in missing:
      print(f'{"":<30} missing {line}')
  return 0


def _plot(args: argparse.Namespace) -> int:
  from fedjax_lite import _sweep_command

  try:
    if _sweep_command.is_sweep(args.run_dir):
      paths = _sweep_command.plot_sweep(args.run_dir, args.out, args.metric)
    else:
      paths = simulation.plot_run(args.run_dir, args.out, metric=args.metric)
  except LookupError as error:  # no such metric
    raise ConfigError(f'--metric: {error.args[0]}') from None
  except (FileNotFoundError, ValueError) as error:
    raise ConfigError(f'RUN_DIR: {error}') from None
  for path in paths:
    print(path)
  return 0


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f'expected a number > 0; got {text}')
  return value


def _int_at_least_1(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an int >= 1; got {text}')
  return value


def _int_at_least_0(text: str) -> int:
  value = int(text)
  if value < 0:
    raise argparse.ArgumentTypeError(f'expected an int >= 0; got {text}')
  return value


class _ArgumentError(Exception):
  """A command line argparse refused: the parser that refused it and its message."""

  def __init__(self, parser: argparse.ArgumentParser, message: str):
    super().__init__(message)
    self.parser, self.message = parser, message


class _Parser(argparse.ArgumentParser):
  """An ArgumentParser whose errors are one line (`fedjax-lite train: error: ...`, no usage) and
  that takes no abbreviated flags (`--rou 2` is not `--rounds 2`); its subcommands are the same."""

  def __init__(self, *args, **kwargs):
    self.flags: list[str] = []  # its long flags, for suggestions
    super().__init__(*args, allow_abbrev=False, **kwargs)
    self.set_defaults(parser=self)  # the namespace names the (sub)command's parser

  def add_argument(self, *args, **kwargs):
    action = super().add_argument(*args, **kwargs)
    self.flags += [s for s in action.option_strings if s.startswith('--')]
    return action

  def error(self, message: str):
    raise _ArgumentError(self, message)


def _suggestion(word: str, choices: Sequence[str]) -> str:
  """` Did you mean X?`: the one choice `word` abbreviates, else the closest (difflib), or ''."""
  close = [c for c in choices if c.startswith(word)]
  if len(close) != 1:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
  return f' Did you mean {close[0]}?' if close else ''


def _unknown_arguments(parser: _Parser, extras: Sequence[str]) -> str:
  """The one-line error of the arguments `parser` does not know, with the closest flag."""
  unknown = [a for a in extras if a.startswith('-')]
  if not unknown:
    return f'unexpected argument {extras[0]!r} ({parser.prog} --help lists the arguments)'
  name = unknown[0].split('=', 1)[0]
  hint = _suggestion(name, parser.flags)
  return f'unknown flag {name}.{hint} ({parser.prog} --help lists the flags)'


def build_parser() -> argparse.ArgumentParser:
  parser = _Parser(prog='fedjax-lite', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True, parser_class=_Parser)
  train = commands.add_parser(
    'train',
    help='train a federated model (default: FedAvg on the digits data)',
    description='Flags override --config FILE.toml, which overrides the defaults.',
  )
  _config.add_flags(train)
  train.add_argument('--config', metavar='FILE.toml', help='settings (same keys as the flags)')
  train.add_argument('--out', metavar='DIR', help='run folder (default runs/DATASET-MODEL-ALGO)')
  train.add_argument('--resume', action='store_true', help='continue the run in --out')
  train.add_argument('--quiet', action='store_true', help='no progress or per-round lines')
  train.add_argument(
    '--processes',
    type=_int_at_least_1,
    default=1,
    metavar='N',
    help='run as N processes on this machine, one per core share (multi-process runtime). '
    f'Below {MIN_CLIENTS_PER_PROCESS} clients a round per process it notes that one process is '
    "likely faster: 2 processes on 2 shared cores ran the default job's rounds (10 clients) at "
    "0.3x one process's speed, and benchmarks/multiprocess.py's at 0.5x-0.95x with 10-40 "
    'clients a round, 0.6x-1.5x with 100 and 1.0x-2.2x with 200-1,000',
  )
  train.add_argument(
    '--distributed',
    action='store_true',
    help='join a multi-process run (jax.distributed; see docs/simulation.md)',
  )
  train.set_defaults(run=_train)
  sweep = commands.add_parser(
    'sweep',
    help='run a grid of train settings as few compiled programs as possible',
    description='A TOML file of train settings where any setting may be a list: the grid is '
    'every combination. Learning rates, --proximal-strength and the seed vary inside one '
    'program; other settings make separate programs.',
  )
  sweep.add_argument('--config', metavar='FILE.toml', required=True, help='the grid')
  sweep.add_argument('--out', metavar='DIR', help='default runs/sweep-NAME (NAME of the file)')
  sweep.add_argument(
    '--runs-per-program', type=_int_at_least_1, help='most runs one compiled call advances'
  )
  sweep.add_argument('--quiet', action='store_true', help='no progress or per-program lines')
  sweep.set_defaults(run=_sweep)
  evaluate = commands.add_parser('eval', help="evaluate a run's checkpoint on its test data")
  evaluate.add_argument('run_dir', metavar='RUN_DIR')
  evaluate.add_argument('--round', type=_int_at_least_0, help='default: the latest checkpoint')
  evaluate.add_argument(
    '--personalize',
    action='store_true',
    help="also personalization evaluation: fine-tune on half of each held-out client's "
    'examples, test on the other half, against the global model',
  )
  evaluate.add_argument(
    '--fine-tune-epochs',
    type=_int_at_least_1,
    nargs='+',
    default=[1, 5],
    metavar='E',
    help='one SGD fine-tuning strategy per value (default 1 5)',
  )
  evaluate.add_argument(
    '--fine-tune-lr',
    type=_positive_float,
    metavar='LR',
    help="fine-tuning SGD rate (default the run's)",
  )
  evaluate.add_argument(
    '--personalize-clients',
    type=_int_at_least_1,
    default=100,
    metavar='N',
    help='held-out clients evaluated (default 100)',
  )
  evaluate.set_defaults(run=_eval)
  datasets = commands.add_parser(
    'datasets', help='list the datasets and tasks, which are here and what is missing'
  )
  datasets.add_argument(
    '--data-path', metavar='DIR', help='look here, not in $FEDJAX_LITE_DATA_DIR or the defaults'
  )
  datasets.set_defaults(run=_datasets)
  plot = commands.add_parser(
    'plot',
    help="write PNG curves of a run's metrics, or compare a sweep's runs",
    description='RUN_DIR: a run folder (loss.png, accuracy.png, and epsilon.png for a DP run) '
    'or a sweep folder (comparison.png: the runs of each configuration as mean ± std).',
  )
  plot.add_argument('run_dir', metavar='RUN_DIR')
  plot.add_argument('--out', metavar='DIR', help='default: RUN_DIR')
  plot.add_argument(
    '--metric',
    metavar='NAME',
    help='plot this metric only: a key of metrics.jsonl (evaluation/loss) or a short name '
    '(accuracy, loss, epsilon: test first, then train); default: loss and accuracy',
  )
  plot.set_defaults(run=_plot)
  return parser


@contextlib.contextmanager
def _one_line_warnings(command: str):
  """Within: warnings print as `fedjax-lite COMMAND: warning: ...`, without a source line."""
  original = warnings.formatwarning
  warnings.formatwarning = lambda message, *_, **__: f'fedjax-lite {command}: warning: {message}\n'
  try:
    yield
  finally:
    warnings.formatwarning = original


def _stdout_to_devnull() -> None:
  """Points stdout at /dev/null: its reader left (`| head`), so no later write or flush, the
  interpreter's own at exit included, may fail with a BrokenPipeError trace."""
  try:
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
  except (AttributeError, OSError, ValueError):  # a stdout without a file (tests capture it)
    sys.stdout = open(os.devnull, 'w')  # noqa: SIM115 (stdout for the rest of the process)


def main(argv: Sequence[str] | None = None) -> int:
  """Runs a command; user errors are one line on stderr and exit status 2 (130 for Ctrl-C).
  Output to a pipe whose reader left (`fedjax-lite datasets | head -1`) ends quietly, status 0."""
  try:
    try:
      return _main(argv)
    finally:
      sys.stdout.flush()  # a reader that left is seen here, not at interpreter exit
  except BrokenPipeError:
    _stdout_to_devnull()
    return 0


def _main(argv: Sequence[str] | None) -> int:
  parser = build_parser()
  try:
    args, extras = parser.parse_known_args(argv)
    if extras:
      raise _ArgumentError(args.parser, _unknown_arguments(args.parser, extras))
  except _ArgumentError as error:
    print(f'{error.parser.prog}: error: {error.message}', file=sys.stderr)
    return 2
  args.argv = list(sys.argv[1:] if argv is None else argv)
  try:
    with _one_line_warnings(args.command):
      return args.run(args)
  except ConfigError as error:
    print(f'fedjax-lite {args.command}: error: {error}', file=sys.stderr)
    return 2
  except OSError as error:
    if isinstance(error, BrokenPipeError):  # `fedjax-lite datasets | head`: the reader left
      raise
    detail = f'{error.filename}: {error.strerror}' if error.filename and error.strerror else error
    print(f'fedjax-lite {args.command}: error: {detail}', file=sys.stderr)
    return 2
  except ImportError as error:  # an optional extra (plot, tensorboard, hdf5) is not installed
    print(f'fedjax-lite {args.command}: error: {error}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    # Checkpoints are written atomically: the latest one on disk is whole; --resume continues.
    print(f'fedjax-lite {args.command}: interrupted', file=sys.stderr)
    return 130


if __name__ == '__main__':
  sys.exit(main())
