"""The experiment settings of `fedjax-lite train`: one table of options, read from defaults, a
TOML file and command-line flags (flags override the file, the file overrides defaults)."""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedjax_lite import _catalogue
from fedjax_lite.data import _registry

MODELS = _catalogue.MODELS
ALGORITHMS = tuple(_catalogue.ALGORITHMS)
OPTIMIZERS = tuple(_catalogue.OPTIMIZERS)
PARTITIONS = ('dirichlet', 'iid', 'shards', 'power_law')
STRAGGLER_POLICIES = ('drop', 'partial')
AGGREGATORS = (
  'mean',
  'robust',
  'clip',
  'zero',
  'compression',
  'secure',
  'dp',
  'median',
  'trimmed_mean',
  'krum',
)


class ConfigError(ValueError):
  """A bad setting; the message names the flag or key, the expectation and what came."""


def _int(low: int, high: int | None = None) -> Callable[[Any], int]:
  """An int in `[low, high]` (no upper bound when `high` is None)."""
  expected = f'an int >= {low}' if high is None else f'an int in [{low}, {high}]'

  def parse(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
      raise ValueError(f'expected {expected}; got {value!r}')
    try:
      number = int(value)
    except ValueError:
      raise ValueError(f'expected {expected}; got {value!r}') from None
    if number < low or (high is not None and number > high):
      raise ValueError(f'expected {expected}; got {value!r}')
    return number

  return parse


def _number(low: float, high: float = math.inf, low_inclusive: bool = False) -> Callable:
  """A finite number above `low` (or at it, when `low_inclusive`) and below `high`."""
  if high == math.inf:
    expected = f'a number {">=" if low_inclusive else ">"} {low:g}'
  else:
    expected = f'a number in {"[" if low_inclusive else "("}{low:g}, {high:g})'

  def parse(value: Any) -> float:
    try:
      number = float(value)
    except (TypeError, ValueError):
      raise ValueError(f'expected {expected}; got {value!r}') from None
    above_low = number >= low if low_inclusive else number > low
    if isinstance(value, bool) or not (above_low and number < high):
      raise ValueError(f'expected {expected}; got {value!r}')
    return number

  return parse


_positive_float = _number(0)


def _optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
  return lambda value: None if value in (None, 'none', 'None') else parse(value)


def _choice(choices: Sequence[str]) -> Callable[[Any], str]:
  def parse(value: Any) -> str:
    if value not in choices:
      raise ValueError(f'unknown name {value!r}; expected one of {", ".join(choices)}')
    return value

  return parse


_IMPORT_PATH = re.compile(r'[A-Za-z_][\w.]*:[A-Za-z_]\w*')


def _model(value: Any) -> str:
  """A model of the catalogue, or an import path `module:callable` (checked when built)."""
  if value in MODELS or (isinstance(value, str) and _IMPORT_PATH.fullmatch(value)):
    return value
  raise ValueError(
    f'unknown name {value!r}; expected one of {", ".join(MODELS)}, or an import path '
    'module:callable'
  )


def _chunk(value: Any) -> int | str:
  """'auto' or an int >= 1."""
  if value == 'auto':
    return value
  try:
    return _int(1)(value)
  except ValueError:
    raise ValueError(f"expected 'auto' or an int >= 1; got {value!r}") from None


def _bool(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  raise ValueError(f'expected true or false; got {value!r}')


@dataclasses.dataclass(frozen=True)
class Option:
  name: str
  parse: Callable[[Any], Any]
  default: Any
  help: str


OPTIONS = (
  Option('dataset', _choice(tuple(_registry.DATASETS)), 'digits', 'see `fedjax-lite datasets`'),
  Option('data_path', _optional(str), None, "the dataset's files, if not at the default place"),
  Option('model', _model, 'mlp', ' | '.join(MODELS) + ' | module:callable (your own)'),
  Option('algorithm', _choice(ALGORITHMS), 'fedavg', ' | '.join(ALGORITHMS)),
  Option('rounds', _int(1), 30, 'training rounds'),
  Option('clients_per_round', _int(1), 10, 'cohort size'),
  Option('num_clients', _int(1), 30, 'clients to split a centralized dataset into'),
  Option('partition', _choice(PARTITIONS), 'dirichlet', ' | '.join(PARTITIONS)),
  Option('alpha', _positive_float, 0.5, 'Dirichlet label skew (partition=dirichlet)'),
  Option('client_optimizer', _choice(OPTIMIZERS), 'sgd', ' | '.join(OPTIMIZERS)),
  Option('client_lr', _positive_float, 0.1, 'client learning rate'),
  Option('recon_lr', _positive_float, 0.1, 'reconstruction learning rate (fedrecon)'),
  Option('server_optimizer', _choice(OPTIMIZERS), 'sgd', ' | '.join(OPTIMIZERS)),
  Option('server_lr', _positive_float, 1.0, 'server learning rate'),
  Option('proximal_strength', _number(0, low_inclusive=True), 0.01, 'FedProx mu (fedprox)'),
  Option('aggregator', _choice(AGGREGATORS), 'mean', ' | '.join(AGGREGATORS)),
  Option('clip', _optional(_positive_float), None, 'L2 clip (clip, dp); none: adaptive'),
  Option(
    'noise_multiplier', _optional(_number(0, low_inclusive=True)), None, 'DP noise / clip (dp)'
  ),
  Option(
    'target_delta', _optional(_number(0, 1)), None, 'DP delta, below 1/clients; none: 0.1/clients'
  ),
  Option('epsilon_budget', _optional(_positive_float), None, 'stop before epsilon exceeds it'),
  Option(
    'trim_fraction', _number(0, 0.5, low_inclusive=True), 0.1, 'trimmed per side (trimmed_mean)'
  ),
  Option('byzantine', _int(0), 1, 'Byzantine clients tolerated (krum)'),
  Option('bits', _int(1), 8, 'bits per coordinate, 1..16 (compression)'),
  Option('compute_dtype', _choice(('float32', 'bfloat16')), 'float32', 'forward/backward dtype'),
  Option('batch_size', _int(1), 16, 'examples per local step'),
  Option(
    'client_chunk_size', _chunk, 'auto', 'clients per vmapped step; auto: measured (see --no-tune)'
  ),
  Option('no_tune', _bool, False, "auto chunk: the backend's default (8 on a CPU), not measured"),
  Option('epochs', _int(1), 2, 'local epochs'),
  Option('max_steps', _optional(_int(1)), None, 'cap on local steps per client'),
  Option(
    'stragglers',
    _number(0, 1, low_inclusive=True),
    0.0,
    'share of each cohort doing part of its work',
  ),
  Option('straggler_policy', _choice(STRAGGLER_POLICIES), 'partial', 'drop | partial (stragglers)'),
  Option('seed', _int(0, 2**32 - 1), 0, 'seeds the model, partition, cohorts and shuffles'),
  Option('eval_every', _int(1), 5, 'evaluate every N rounds (and after the last)'),
  Option('checkpoint_every', _int(1), 1, 'checkpoint every N rounds (and after the last)'),
  Option('keep', _int(1), 3, 'checkpoints kept'),
  Option('tensorboard', _bool, False, 'also write TensorBoard events (needs tensorboardX)'),
)
OPTION_NAMES = tuple(o.name for o in OPTIONS)
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


def flag(name: str) -> str:
  return '--' + name.replace('_', '-')


def add_flags(parser: argparse.ArgumentParser) -> None:
  """One flag per option, defaulting to 'not given' so the file and defaults can fill in."""
  for option in OPTIONS:
    if option.parse is _bool:
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
  for key, value in table.items():
    name = key.replace('-', '_')
    if name not in OPTION_NAMES:
      raise ConfigError(f'{path}: unknown key {key!r}; expected one of {", ".join(OPTION_NAMES)}')
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
  option = OPTIONS[OPTION_NAMES.index(name)]
  try:
    return option.parse(value)
  except ValueError as error:
    raise ConfigError(f'{where}: {error}') from None


def resolve(flags: Mapping[str, Any], file_settings: Mapping[str, Any] = ()) -> dict[str, Any]:
  """Every option: defaults, then `file_settings`, then `flags` (raw strings, parsed here)."""
  config = {o.name: o.default for o in OPTIONS}
  config.update(file_settings)
  for name, value in flags.items():
    config[name] = parse_setting(name, value, flag(name))
  return config


def differences(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
  """`key: saved -> given` for the settings a resumed run may not change."""
  return [
    f'{name}: {saved.get(name)!r} -> {config[name]!r}'
    for name in OPTION_NAMES
    if name not in RESUMABLE and saved.get(name) != config[name]
  ]
