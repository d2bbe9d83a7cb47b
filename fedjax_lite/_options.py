"""The command's settings and the registries that declare them.

An `Option` is one setting: its flag `--name`, its TOML key `name`, how a value is parsed and
checked, its default, and (for a sweep) where it sits in a process's hyperparameters. A
`Registry` is one kind of named thing the command builds (algorithms, aggregators, partitions,
models, tasks); each `Entry` names the settings it reads, declares the ones that are its own and
gives its defaults, so a setting, its flag, its TOML key, its sweep and its checks come from the
entry that reads it. A setting given to an entry that does not read it is an error.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import os
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

IMPORT_PATH = re.compile(r'[A-Za-z_][\w.]*:[A-Za-z_]\w*')


@dataclasses.dataclass(frozen=True)
class Option:
  """One setting of `fedjax-lite train`.

  Attributes:
    name: the TOML key; the flag is `--name` with `-` for `_`.
    parse: `raw value -> value`; raises ValueError saying what was expected and what came.
    default: the value when neither a flag nor the file gives it.
    help: one line for `--help`.
    hparam: where a sweep sets it in `process.get_hparams(state)` (a path of keys), so runs
      that differ in it share one program; None: runs that differ in it are separate programs.
  """

  name: str
  parse: Callable[[Any], Any]
  default: Any
  help: str
  hparam: tuple[str, ...] | None = None


def flag(name: str) -> str:
  return '--' + name.replace('_', '-')


def int_in(low: int, high: int | None = None) -> Callable[[Any], int]:
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


def number_in(low: float, high: float = math.inf, low_inclusive: bool = False) -> Callable:
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


positive = number_in(0)
non_negative = number_in(0, low_inclusive=True)


def optional(parse: Callable[[Any], Any]) -> Callable[[Any], Any]:
  return lambda value: None if value in (None, 'none', 'None') else parse(value)


def choice(choices: Sequence[str] | Callable[[], Sequence[str]]) -> Callable[[Any], str]:
  """One of `choices` (or of `choices()`, read when parsing)."""

  def parse(value: Any) -> str:
    names = choices() if callable(choices) else choices
    if value not in names:
      raise ValueError(f'unknown name {value!r}; expected one of {", ".join(names)}')
    return value

  return parse


def boolean(value: Any) -> bool:
  if isinstance(value, bool):
    return value
  raise ValueError(f'expected true or false; got {value!r}')


@dataclasses.dataclass(frozen=True, kw_only=True)
class Entry:
  """A named thing the command builds.

  Attributes:
    name: its name (`--KIND NAME`).
    description: one line for `--help` and listings.
    build: its builder; each registry says what it takes and returns.
    reads: the registry's shared settings it reads (`Registry.shared`).
    settings: its own settings: flags, TOML keys and sweep axes of their own.
    defaults: its own defaults of other settings (a new run's, where not given).
    check: `config -> None`, raising ValueError for its settings that do not go together.
  """

  name: str
  description: str
  build: Callable[..., Any] | None
  reads: tuple[str, ...] = ()
  settings: tuple[Option, ...] = ()
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  check: Callable[[Mapping[str, Any]], None] | None = None

  def reads_all(self) -> tuple[str, ...]:
    """Every setting it reads: the shared ones it names and its own."""
    return (*self.reads, *(o.name for o in self.settings))


class Registry(Mapping[str, Entry]):
  """Entries of one kind by name, selected by the setting `kind` (`--algorithm NAME`).

  Settings that only some entries read are the registry's: `shared` (read by several, named in
  their `reads`) and each entry's own `settings`. `register` adds an entry; its settings become
  flags, TOML keys and (with an `hparam`) sweep axes of the command.
  """

  def __init__(
    self,
    kind: str,
    entries: Sequence[Entry],
    shared: Sequence[Option] = (),
    from_import: Callable[[str, Callable], Entry] | None = None,
    import_hint: str = '',
  ):
    """`from_import(path, callable)`: the entry of a `module:callable` given as the name (one
    reading every shared setting); None: names only. `import_hint`: what that callable is."""
    self.kind, self.shared = kind, tuple(shared)
    self._from_import, self._import_hint = from_import, import_hint
    self._entries: dict[str, Entry] = {}
    for entry in entries:
      self.register(entry)

  @property
  def takes_imports(self) -> bool:
    """Whether a `module:callable` may name an entry."""
    return self._from_import is not None

  def __getitem__(self, name: str) -> Entry:
    return self._entries[name]

  def __iter__(self) -> Iterator[str]:
    return iter(self._entries)

  def __len__(self) -> int:
    return len(self._entries)

  def register(self, entry: Entry) -> None:
    """Adds `entry`; raises ValueError for a taken name or a setting declared differently."""
    if entry.name in self._entries:
      raise ValueError(f'{self.kind} {entry.name!r} is already registered')
    known = {o.name: o for o in self.options()}
    for option in entry.settings:
      if option.name in known and known[option.name] != option:
        raise ValueError(
          f'{self.kind} {entry.name!r} declares setting {option.name!r}, which another entry '
          'declares differently; declare it with the same Option object, or make it shared'
        )
    unknown = [name for name in entry.reads if name not in {o.name for o in self.shared}]
    if unknown:
      raise ValueError(
        f'{self.kind} {entry.name!r} reads {unknown}, which are not shared {self.kind} settings '
        f'({", ".join(o.name for o in self.shared)}); declare its own in `settings`'
      )
    self._entries[entry.name] = entry

  def unregister(self, name: str) -> None:
    del self._entries[name]

  def options(self) -> tuple[Option, ...]:
    """The shared settings and every entry's own, each once."""
    seen: dict[str, Option] = {o.name: o for o in self.shared}
    for entry in self._entries.values():
      for option in entry.settings:
        seen.setdefault(option.name, option)
    return tuple(seen.values())

  def parse(self, value: Any) -> str:
    """A registered name, or an import path `module:callable` where the registry takes one."""
    if isinstance(value, str) and value in self._entries:
      return value
    if self._from_import and isinstance(value, str) and IMPORT_PATH.fullmatch(value):
      return value
    tail = f', or an import path module:callable ({self._import_hint})' if self._from_import else ''
    raise ValueError(f'unknown name {value!r}; expected one of {", ".join(self)}{tail}')

  def entry(self, name: str) -> Entry:
    """`self[name]`, or the entry of an import path (imported now; raises ValueError naming the
    path when it cannot be used)."""
    if name in self._entries:
      return self._entries[name]
    if self._from_import is None or not IMPORT_PATH.fullmatch(name):
      self.parse(name)  # raises
    return self._from_import(name, load_callable(name))

  def reads(self, name: str) -> tuple[str, ...]:
    """What entry `name` reads; an import path reads every shared setting (not imported)."""
    if name in self._entries:
      return self._entries[name].reads_all()
    return tuple(o.name for o in self.shared)

  def unread(self, config: Mapping[str, Any], given: set[str]) -> list[str]:
    """The settings in `given` that are this registry's but not read by `config`'s entry."""
    reads = set(self.reads(config[self.kind]))
    return [o.name for o in self.options() if o.name in given and o.name not in reads]


def load_callable(path: str) -> Callable:
  """The callable at `module:attribute`, its module imported from the working folder (as
  `python -m` would) or `sys.path`; raises ValueError naming the path when it cannot be used."""
  module_name, _, attribute = path.partition(':')
  if os.getcwd() not in sys.path:
    sys.path.insert(0, os.getcwd())
  try:
    found = getattr(importlib.import_module(module_name), attribute)
  except ImportError as error:
    raise ValueError(f'{path}: cannot import {module_name} ({error})') from None
  except AttributeError:
    raise ValueError(f'{path}: {module_name} has no {attribute}') from None
  if not callable(found):
    raise ValueError(f'{path} is not callable; got {type(found).__name__}')
  return found
