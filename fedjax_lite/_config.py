"""The experiment settings of `fedjax-lite train`: one table of options, read from defaults, a
TOML file and command-line flags (flags override the file, the file overrides defaults).

The run's own settings are here; an algorithm's, an aggregator's, a partition's or a model's
come from its catalogue entry (`fedjax_lite._catalogue`), so registering an entry adds its
flags, TOML keys and sweep axes."""

from __future__ import annotations

import argparse
import tomllib
from collections.abc import Mapping
from typing import Any

from fedjax_lite import _catalogue
from fedjax_lite._options import (
  Option,
  Registry,
  boolean,
  choice,
  flag,
  int_in,
  number_in,
  optional,
)
from fedjax_lite.data import _registry

STRAGGLER_POLICIES = ('drop', 'partial')


class ConfigError(ValueError):
  """A bad setting; the message names the flag or key, the expectation and what came."""


def _chunk(value: Any) -> int | str:
  """'auto' or an int >= 1."""
  if value == 'auto':
    return value
  try:
    return int_in(1)(value)
  except ValueError:
    raise ValueError(f"expected 'auto' or an int >= 1; got {value!r}") from None


def _selector(registry: Registry, default: str) -> Option:
  """The setting that picks an entry of `registry`."""
  own = ' | module:callable (your own)' if registry.takes_imports else ''
  return Option(registry.kind, registry.parse, default, ' | '.join(registry) + own)


def options() -> tuple[Option, ...]:
  """Every setting: the run's own and those the registries' entries declare (read now, so an
  entry registered later brings its settings)."""
  catalogue = _catalogue
  return (
    Option('dataset', choice(tuple(_registry.DATASETS)), 'digits', 'see `fedjax-lite datasets`'),
    Option('data_path', optional(str), None, "the dataset's files, if not at the default place"),
    Option(
      'task',
      optional(catalogue.TASKS.parse),
      None,
      ' | '.join(catalogue.TASKS) + ' | module:callable: its data, model and defaults',
    ),
    Option('stand_in', boolean, False, "with --task: its generated stand-in data, not TFF's files"),
    _selector(catalogue.MODELS, 'mlp'),
    *catalogue.MODELS.options(),
    _selector(catalogue.ALGORITHMS, 'fedavg'),
    Option('rounds', int_in(1), 30, 'training rounds'),
    Option('clients_per_round', int_in(1), 10, 'cohort size'),
    Option('num_clients', int_in(1), 30, 'clients to split a centralized dataset into'),
    _selector(catalogue.PARTITIONS, 'dirichlet'),
    *catalogue.PARTITIONS.options(),
    *catalogue.ALGORITHMS.options(),
    _selector(catalogue.AGGREGATORS, 'mean'),
    *catalogue.AGGREGATORS.options(),
    Option('compute_dtype', choice(('float32', 'bfloat16')), 'float32', 'forward/backward dtype'),
    Option('batch_size', int_in(1), 16, 'examples per local step'),
    Option(
      'client_chunk_size',
      _chunk,
      'auto',
      'clients per vmapped step; auto: measured (see --no-tune)',
    ),
    Option(
      'no_tune', boolean, False, "auto chunk: the backend's default (8 on a CPU), not measured"
    ),
    Option('epochs', int_in(1), 2, 'local epochs'),
    Option('max_steps', optional(int_in(1)), None, 'cap on local steps per client'),
    Option(
      'stragglers',
      number_in(0, 1, low_inclusive=True),
      0.0,
      'share of each cohort doing part of its work',
    ),
    Option(
      'straggler_policy', choice(STRAGGLER_POLICIES), 'partial', 'drop | partial (stragglers)'
    ),
    Option('seed', int_in(0, 2**32 - 1), 0, 'seeds the model, partition, cohorts and shuffles'),
    Option('eval_every', int_in(1), 5, 'evaluate every N rounds (and after the last)'),
    Option('checkpoint_every', int_in(1), 1, 'checkpoint every N rounds (and after the last)'),
    Option('keep', int_in(1), 3, 'checkpoints kept'),
    Option('tensorboard', boolean, False, 'also write TensorBoard events (needs tensorboardX)'),
  )


def option_names() -> tuple[str, ...]:
  return tuple(o.name for o in options())


def in_program() -> dict[str, tuple[str, ...]]:
  """Setting -> where it sits in `process.get_hparams(state)`: the settings a sweep varies
  inside one program."""
  return {o.name: o.hparam for o in options() if o.hparam is not None}


# Settings that may differ between a run and its resumption.
RESUMABLE = (
  'rounds',
  'eval_every',
  'checkpoint_every',
  'keep',
  'tensorboard',
  'client_chunk_size',  # speed only: the chunk changes float sums' order, not the run
  'no_tune',
)
# The per-client states of a stateful algorithm (SCAFFOLD) in a run folder.
CLIENT_STATES_FILE = 'client_states.sqlite'


def add_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per option, defaulting to 'not given' so the file and defaults can fill in."""
  for option in options():
    if option.parse is boolean:
      parser.add_argument(
        flag(option.name), action='store_true', default=argparse.SUPPRESS, help=option.help
      )
    else:
      parser.add_argument(
        flag(option.name),
        default=argparse.SUPPRESS,
        metavar=option.name.upper(),
        help=f'{option.help} (default {option.default})',
      )


def read_toml_table(path: str) -> dict[str, tuple[str, Any]]:
  """A settings file's raw values by option name, `name -> (key as written, value)` (keys with
  `_` or `-`); an unreadable file or an unknown key is a ConfigError naming it."""
  try:
    with open(path, 'rb') as f:
      table = tomllib.load(f)
  except FileNotFoundError:
    raise ConfigError(f'--config: no file {path!r}') from None
  except (tomllib.TOMLDecodeError, UnicodeDecodeError) as error:
    raise ConfigError(f'--config: {path} is not valid TOML: {error}') from None
  except OSError as error:
    raise ConfigError(f'--config: cannot read {path!r}: {error.strerror}') from None
  raw = {}
  known = option_names()
  for key, value in table.items():
    name = key.replace('-', '_')
    if name not in known:
      names = ', '.join(known)
      raise ConfigError(f'{path}: unknown key {key!r}; expected one of {names}')
    raw[name] = (key, value)
  return raw


def read_toml(path: str) -> dict[str, Any]:
  """The options of a TOML file, parsed."""
  return {
    name: parse_setting(name, value, f'{path}: {key}')
    for name, (key, value) in read_toml_table(path).items()
  }


def parse_setting(name: str, value: Any, where: str) -> Any:
  """`value` of setting `name` parsed; a bad one is a ConfigError naming `where`."""
  option = next(o for o in options() if o.name == name)
  try:
    return option.parse(value)
  except ValueError as error:
    raise ConfigError(f'{where}: {error}') from None


def resolve(flags: Mapping[str, Any], file_settings: Mapping[str, Any] = ()) -> dict[str, Any]:
  """Every option: defaults, then `file_settings`, then `flags` (raw strings, parsed here)."""
  config = {o.name: o.default for o in options()}
  config.update(file_settings)
  for name, value in flags.items():
    config[name] = parse_setting(name, value, flag(name))
  return config


def pinned(saved: Mapping[str, Any]) -> tuple[str, ...]:
  """The RESUMABLE settings a saved run's aggregator pins (DP-FTRL: its rounds)."""
  return getattr(_catalogue.AGGREGATORS.get(saved.get('aggregator')), 'pins', ())


def differences(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
  """`key: saved -> given` for the settings a resumed run may not change (those not RESUMABLE,
  and those its aggregator pins)."""
  pins = pinned(saved)
  return [
    f'{o.name}: {saved.get(o.name, o.default)!r} -> {config[o.name]!r}'
    for o in options()
    if (o.name not in RESUMABLE or o.name in pins)
    and saved.get(o.name, o.default) != config[o.name]
  ]
