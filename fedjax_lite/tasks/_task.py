"""`Task`: a dataset, its preprocessing, a model, TFF's metrics and a paper's hyperparameters."""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from fedjax_lite.data import _federated_data, _federated_datasets, _tff_h5
from fedjax_lite.models import _model

# The settings of `fedjax-lite train` a task's `defaults` may set (`_config.options()`' names).
DEFAULT_KEYS = (
  'client_optimizer',
  'client_lr',
  'server_optimizer',
  'server_lr',
  'batch_size',
  'epochs',
  'clients_per_round',
  'rounds',
  'max_steps',
)


@dataclasses.dataclass(frozen=True)
class DataFile:
  """One file a task reads.

  Attributes:
    name: the file's name, e.g. `fed_emnist_train.h5`.
    origin: where TFF published it (an archive holding the file).
    required: False for files the task uses when present (e.g. a validation split).
  """

  name: str
  origin: str
  required: bool = True


@dataclasses.dataclass(frozen=True)
class TaskData:
  """A task's populations, clients already in the model's batch form `{'x': ..., 'y': ...}`.

  Attributes:
    train: the training clients.
    test: held-out clients for evaluation.
    validation: a second held-out population where TFF has one (Stack Overflow's `held_out`);
      None otherwise.
  """

  train: _federated_data.FederatedData
  test: _federated_data.FederatedData
  validation: _federated_data.FederatedData | None = None


# A task's raw clients: split -> client id -> feature -> array, in TFF's HDF5 layout.
RawClients = Mapping[str, Mapping[str, Mapping[str, Any]]]


@dataclasses.dataclass(frozen=True)
class Task:
  """One of TFF's baseline tasks (`tff.simulation.baselines`).

  Example:
    >>> task = fl.tasks.get_task('emnist_character')
    >>> data = task.stand_in(num_clients=2, seed=0)  # or task.load(path)
    >>> process = fl.algorithms.build_weighted_fed_avg(task.model(seed=0), ...)

  Attributes:
    name: the registry name (`fedjax-lite train --task NAME`).
    description: one line.
    sources: what -> where it comes from (paper, TFF file), for every default and definition.
    defaults: `fedjax-lite train` option name -> value (`DEFAULT_KEYS`).
    tuned: server optimizer (the catalogue's name) -> the paper's best `client_lr`, `server_lr`
      and, for adaptive ones, `epsilon` with that server optimizer and client SGD (a record:
      `settings` offers only the non-adaptive rows, see there).
    files: the files `load` reads.
    input_spec: one batch, `{'x': ShapeDtypeStruct, 'y': ShapeDtypeStruct}`.
    metric_names: what training and evaluation report (TFF's names).
    num_outputs: classes, tags or vocabulary ids the model scores.
    special_tokens: pad/OOV/BOS/EOS ids of a token task; None otherwise.
  """

  name: str
  description: str
  sources: Mapping[str, str]
  defaults: Mapping[str, Any]
  tuned: Mapping[str, Mapping[str, float]]
  files: tuple[DataFile, ...]
  input_spec: Any
  metric_names: tuple[str, ...]
  num_outputs: int
  special_tokens: Any = None
  # (seed) -> FunctionalModel
  build_model: Callable[[int], _model.FunctionalModel] = dataclasses.field(
    default=None, repr=False, compare=False
  )
  # (paths of `files` found, seed) -> TaskData
  read: Callable[[Mapping[str, pathlib.Path], int], TaskData] = dataclasses.field(
    default=None, repr=False, compare=False
  )
  # (num_clients, seed) -> (raw clients, vocabulary files {name: text})
  generate: Callable[[int, int], tuple[RawClients, Mapping[str, str]]] = dataclasses.field(
    default=None, repr=False, compare=False
  )
  # (raw populations {split: FederatedData}, vocabulary files {name: text}, seed) -> TaskData
  prepare: Callable[..., TaskData] = dataclasses.field(default=None, repr=False, compare=False)

  def __post_init__(self):
    unknown = sorted(set(self.defaults) - set(DEFAULT_KEYS))
    if unknown:
      raise ValueError(
        f'task {self.name!r} defaults has unknown keys {unknown}; expected keys of {DEFAULT_KEYS}'
      )
    for field in ('build_model', 'read', 'generate', 'prepare'):
      if not callable(getattr(self, field)):
        raise TypeError(
          f'task {self.name!r} {field} must be callable; got {getattr(self, field)!r}'
        )

  def model(self, seed: int = 0) -> _model.FunctionalModel:
    """The task's model with weights initialized from `seed`, reporting `metric_names`."""
    return self.build_model(seed)

  def settings(self, server_optimizer: str | None = None) -> dict[str, Any]:
    """`defaults`, with the paper's learning rates for `server_optimizer` when given.

    Only the paper's non-adaptive methods ('sgd': FedAvg, 'sgdm': FedAvgM) are offered: their
    every setting is a `fedjax-lite train` option. The adaptive ones ('adagrad', 'adam',
    'yogi') are refused: the paper tuned their learning rates together with an epsilon and
    its initial accumulators, which the command's optimizers cannot take (they use the
    catalogue's own: adam epsilon 1e-7, adagrad initial accumulator 0.1, yogi 1e-6), so the
    rates alone would not be the paper's method. `tuned` keeps every row, epsilons included,
    as the record.

    Raises:
      ValueError: `server_optimizer` is adaptive or not a key of `tuned`.
    """
    settings = dict(self.defaults)
    if server_optimizer is not None:
      if server_optimizer not in self.tuned:
        raise ValueError(
          f'server_optimizer must be one of {sorted(self.tuned)} for task {self.name!r}; '
          f'got {server_optimizer!r}'
        )
      rates = self.tuned[server_optimizer]
      if 'epsilon' in rates:
        offered = sorted(k for k, v in self.tuned.items() if 'epsilon' not in v)
        raise ValueError(
          f'server_optimizer {server_optimizer!r} is adaptive: task {self.name!r} has its '
          f"paper's learning rates for it only with epsilon={rates['epsilon']:g} and the "
          "paper's initial accumulator, which the command's optimizers cannot set (they use "
          "their own), so these rates alone are not the paper's method; expected one of "
          f"{offered}. Tip: task.tuned[{server_optimizer!r}] holds the paper's full row."
        )
      settings.update(
        server_optimizer=server_optimizer,
        client_optimizer='sgd',
        client_lr=rates['client_lr'],
        server_lr=rates['server_lr'],
      )
    return settings

  def locate(self, path: str | pathlib.Path | None = None) -> dict[str, pathlib.Path | None]:
    """File name -> where it is (None: not found): in the folder `path`, or with `path=None` in
    `$FEDJAX_LITE_DATA_DIR` then `~/.keras/datasets`. Checks files only; reads nothing."""
    dirs = [pathlib.Path(path)] if path is not None else _federated_datasets.default_data_dirs()
    found = {}
    for file in self.files:
      found[file.name] = next((d / file.name for d in dirs if (d / file.name).is_file()), None)
    return found

  def available(self, path: str | pathlib.Path | None = None) -> bool:
    """Whether every required file is there (file checks only)."""
    return not self.missing(path)

  def missing(self, path: str | pathlib.Path | None = None) -> list[str]:
    """One line per required file not found: its name, where it was looked for, its origin."""
    dirs = [str(path)] if path is not None else [
      str(d) for d in _federated_datasets.default_data_dirs()
    ]  # fmt: skip
    found = self.locate(path)
    return [
      f'{file.name}: not in {" or ".join(dirs)}; TFF published it in {file.origin}'
      for file in self.files
      if file.required and found[file.name] is None
    ]

  def load(self, path: str | pathlib.Path | None = None, seed: int = 0) -> TaskData:
    """The real data from TFF's files in the folder `path` (or the default folders), read lazily
    and preprocessed to `{'x', 'y'}` per client; `seed` seeds random augmentation.

    Raises:
      FileNotFoundError: listing each missing file and where it comes from.
    """
    missing = self.missing(path)
    if missing:
      raise FileNotFoundError(
        f'task {self.name!r} cannot load its data:\n  '
        + '\n  '.join(missing)
        + f'\nTip: pass the folder holding them, or set {_federated_datasets.DATA_DIR_ENV}.'
      )
    found = {k: v for k, v in self.locate(path).items() if v is not None}
    return self.read(found, seed)

  def stand_in_clients(
    self, num_clients: int = 4, seed: int = 0
  ) -> tuple[RawClients, Mapping[str, str]]:
    """Generated raw clients in TFF's layout (split -> client id -> feature -> array, a few
    examples each, real shapes and vocabularies) and the vocabulary files' texts."""
    if not isinstance(num_clients, int) or num_clients < 1:
      raise ValueError(f'num_clients must be an int >= 1; got {num_clients!r}')
    return self.generate(num_clients, seed)

  def stand_in(self, num_clients: int = 4, seed: int = 0) -> TaskData:
    """Generated stand-in data (see `stand_in_clients`) through the same preprocessing as
    `load`: the structures of the real data, small, for tests and benchmarks."""
    raw, vocab_files = self.stand_in_clients(num_clients, seed)
    populations = {
      split: _federated_data.InMemoryFederatedData(clients) for split, clients in raw.items()
    }
    return self.prepare(populations, vocab_files, seed)

  def write_stand_in(
    self, directory: str | pathlib.Path, num_clients: int = 4, seed: int = 0
  ) -> list[pathlib.Path]:
    """Writes the stand-in as TFF's files (HDF5 and vocabulary files) into `directory`, so
    `load(directory)` reads what `stand_in` generates. Needs h5py."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw, vocab_files = self.stand_in_clients(num_clients, seed)
    h5_names = [f.name for f in self.files if f.name.endswith('.h5')]
    written = []
    for split, clients in raw.items():
      name = next(n for n in h5_names if n.endswith(f'_{split}.h5'))
      written.append(write_tff_h5(directory / name, clients))
    names = {f.name for f in self.files}
    for name, text in vocab_files.items():
      if name not in names:
        continue
      (directory / name).write_text(text, encoding='utf-8')
      written.append(directory / name)
    return written


def write_tff_h5(path: pathlib.Path, clients: Mapping[str, Mapping[str, Any]]) -> pathlib.Path:
  """Writes clients in TFF's HDF5 layout, `examples/<client_id>/<feature>` (text as
  variable-length strings)."""
  h5py = _tff_h5._import_h5py()
  with h5py.File(path, 'w') as f:
    for client_id, features in clients.items():
      for feature, values in features.items():
        key = f'examples/{client_id}/{feature}'
        if values.dtype == object:
          f.create_dataset(key, data=list(values), dtype=h5py.string_dtype())
        else:
          f.create_dataset(key, data=values)
  return path


def check_splits(populations: Mapping[str, Any], splits: Sequence[str], task: str) -> None:
  missing = [s for s in splits if s not in populations]
  if missing:
    raise ValueError(
      f'task {task!r} needs the splits {list(splits)}; got {sorted(populations)} (missing '
      f'{missing})'
    )
