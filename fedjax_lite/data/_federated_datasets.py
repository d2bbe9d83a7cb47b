"""EMNIST, Shakespeare and Stack Overflow: naturally federated populations from files a user has.

Each loader reads TFF's HDF5 files (`_tff_h5`, lazily) or, for EMNIST and Shakespeare, LEAF's
JSON splits (`_leaf`). Nothing is downloaded. `path` may be:

- the `.h5` file itself, or a LEAF `.json` file;
- a folder holding TFF's file for the split (e.g. `fed_emnist_digitsonly_train.h5`);
- a LEAF folder with one subfolder per split (`leaf/data/femnist/data`, holding `train/` and
  `test/`), or one split's folder of `.json` files;
- `None`: TFF's file is looked for in `$FEDJAX_LITE_DATA_DIR`, then in `~/.keras/datasets`
  (where TFF's `load_data` extracted its downloads before TFF moved to SQLite).
"""

from __future__ import annotations

import os
import pathlib

import numpy as np

from fedjax_lite.data import _federated_data, _leaf, _tff_h5

DATA_DIR_ENV = 'FEDJAX_LITE_DATA_DIR'
_SPLITS = {
  'emnist': ('train', 'test'),
  'shakespeare': ('train', 'test'),
  'stackoverflow': ('train', 'held_out', 'test'),
}


def default_data_dirs() -> list[pathlib.Path]:
  """Where `path=None` looks: `$FEDJAX_LITE_DATA_DIR` (when set), then `~/.keras/datasets`."""
  dirs = [pathlib.Path(os.environ[DATA_DIR_ENV])] if os.environ.get(DATA_DIR_ENV) else []
  return [*dirs, pathlib.Path.home() / '.keras' / 'datasets']


def tff_file_name(dataset: str, split: str = 'train', only_digits: bool = False) -> str:
  """TFF's HDF5 file name for a split, e.g. `fed_emnist_digitsonly_train.h5`."""
  if dataset not in _SPLITS:
    raise ValueError(f'dataset must be one of {sorted(_SPLITS)}; got {dataset!r}')
  if split not in _SPLITS[dataset]:
    raise ValueError(f'{dataset} split must be one of {_SPLITS[dataset]}; got {split!r}')
  prefix = (
    ('fed_emnist_digitsonly' if only_digits else 'fed_emnist') if dataset == 'emnist' else dataset
  )
  return f'{prefix}_{split}.h5'


def find_source(
  path: str | pathlib.Path | None, h5_name: str, split: str, leaf: bool
) -> tuple[str, pathlib.Path]:
  """`('h5' | 'leaf', file or folder)` for a split; see the module docstring for what `path` may be.

  Raises:
    FileNotFoundError: nothing usable there, with what was looked for.
  """
  if path is None:
    for directory in default_data_dirs():
      if (directory / h5_name).is_file():
        return 'h5', directory / h5_name
    raise FileNotFoundError(
      f'{h5_name} is in none of {[str(d) for d in default_data_dirs()]}. Tip: pass path= the file '
      f'or its folder, or set {DATA_DIR_ENV}; TFF published it in '
      'storage.googleapis.com/tff-datasets-public/<name>.tar.bz2 (docs/datasets.md)'
    )
  path = pathlib.Path(path)
  if path.is_file():
    if path.suffix in ('.h5', '.hdf5'):
      return 'h5', path
    if leaf and path.suffix == '.json':
      return 'leaf', path
    wanted = 'an .h5 file or a LEAF .json file' if leaf else 'an .h5 file'
    raise ValueError(f'path {str(path)!r} is not {wanted}')
  if path.is_dir():
    if (path / h5_name).is_file():
      return 'h5', path / h5_name
    if leaf and (path / split).is_dir():
      return 'leaf', path / split
    if leaf and any(p.suffix == '.json' for p in path.iterdir()):
      return 'leaf', path
    wanted = f'{h5_name}' + (f', a LEAF {split}/ folder or .json files' if leaf else '')
    raise FileNotFoundError(f'directory {str(path)!r} holds no {wanted}')
  raise FileNotFoundError(f'path {str(path)!r} does not exist')


def _load(
  dataset: str,
  path: str | pathlib.Path | None,
  split: str,
  only_digits: bool = False,
  leaf: bool = True,
) -> tuple[str, _federated_data.FederatedData]:
  kind, where = find_source(path, tff_file_name(dataset, split, only_digits), split, leaf)
  return kind, (_tff_h5.load_tff_h5(where) if kind == 'h5' else _leaf.load_leaf(where))


def load_emnist(
  path: str | pathlib.Path | None = None, only_digits: bool = False, split: str = 'train'
) -> _federated_data.FederatedData:
  """Federated EMNIST (Cohen et al., 2017; LEAF's FEMNIST): one client per writer.

  Clients hold `pixels [n, 28, 28]` float32 in [0, 1] (1.0 is the background, as in TFF) and
  `label [n]` int32: 0–9 digits, 10–35 upper case, 36–61 lower case. TFF's files: 3,400
  writers (671,585 train examples), or 3,383 with `only_digits` (341,873).

  Args:
    path: TFF's `fed_emnist[_digitsonly]_{split}.h5`, its folder, or LEAF's FEMNIST split
      (module docstring). From LEAF, `only_digits` keeps the examples labelled 0–9 and drops
      writers left without any.
    only_digits: the 10-class digits-only version.
    split: `'train'` or `'test'`.
  """
  kind, data = _load('emnist', path, split, only_digits)
  if kind == 'h5':
    return data
  clients = {}
  for client_id, d in data:
    if sorted(d) != ['x', 'y'] or d['x'].ndim != 2 or d['x'].shape[1] != 784:
      shapes = {k: v.shape for k, v in d.items()}
      raise ValueError(
        f'LEAF FEMNIST client {client_id!r} has {shapes}; expected x [n, 784], y [n]'
      )
    keep = d['y'] < 10 if only_digits else slice(None)
    if not only_digits or np.any(keep):
      clients[client_id] = {'label': d['y'][keep], 'pixels': d['x'][keep].reshape(-1, 28, 28)}
  return _federated_data.InMemoryFederatedData(clients)


def load_shakespeare(
  path: str | pathlib.Path | None = None, split: str = 'train'
) -> _federated_data.FederatedData:
  """Federated Shakespeare (LEAF): one client per speaking role of a play (715 in TFF's files).

  From TFF's `shakespeare_{split}.h5`, clients hold `snippets [n]` (object array of `bytes`, a
  run of lines each); turn them into id sequences with `shakespeare_preprocess`. From a LEAF
  split, clients hold LEAF's `x [n]` (80-character windows, `str`) and `y [n]` (the next
  character).

  Args:
    path: TFF's file, its folder, or a LEAF Shakespeare split (module docstring).
    split: `'train'` or `'test'`.
  """
  return _load('shakespeare', path, split)[1]


def load_stackoverflow(
  path: str | pathlib.Path | None = None, split: str = 'train'
) -> _federated_data.FederatedData:
  """Federated Stack Overflow (TFF): one client per user, read lazily (342,477 train users).

  Clients hold object arrays of `bytes`: `tokens` (space-separated, lower-cased), `title`,
  `tags` (`|`-separated), `type` (`question` / `answer`), `creation_date`, and `score` int64.

  Args:
    path: TFF's `stackoverflow_{split}.h5` or its folder (module docstring).
    split: `'train'`, `'held_out'` or `'test'`.
  """
  return _load('stackoverflow', path, split, leaf=False)[1]
