"""MovieLens 100K (GroupLens): 100,000 ratings (1–5) by 943 users of 1,682 movies, read offline.

Read from the standard `u.data` a user already has, or by default from the copy bundled in the
recbole package (`recbole/dataset_example/ml-100k/ml-100k.inter`), located without importing
recbole. GroupLens' terms allow research use but not redistribution: the data is read where it
lies and never copied into this repository.

Ids: `user_id` and `item_id` are **0-based dense indices**, ready to index embedding tables: the
i-th smallest original id becomes i, so `num_users = user_id.max() + 1` and every index below it
is used. The original ids are kept in `raw_user_id` / `raw_item_id` (for ml-100k, whose ids run
1..943 and 1..1682, `user_id == raw_user_id - 1`).
"""

from __future__ import annotations

import pathlib

import numpy as np

from fedjax_lite.data import _federated_data, _package_files

RECBOLE_FILE = 'dataset_example/ml-100k/ml-100k.inter'
_COLUMNS = ('user_id', 'item_id', 'rating', 'timestamp')


def movielens_100k_path() -> pathlib.Path:
  """The path of `ml-100k.inter` inside the installed recbole package (not imported)."""
  return _package_files.package_file(
    'recbole',
    RECBOLE_FILE,
    'pip install --no-deps recbole (only its bundled data file is read), or pass path= the '
    'u.data of ml-100k from grouplens.org',
  )


def movielens_file(path: str | pathlib.Path | None) -> pathlib.Path:
  """The ratings file `path` names (itself, or u.data / ml-100k.inter in it); default recbole's."""
  if path is None:
    return movielens_100k_path()
  path = pathlib.Path(path)
  if path.is_dir():
    for name in ('u.data', 'ml-100k.inter'):
      if (path / name).is_file():
        return path / name
    raise FileNotFoundError(f'directory {str(path)!r} has neither u.data nor ml-100k.inter')
  if not path.is_file():
    raise FileNotFoundError(
      f'path {str(path)!r} does not exist; expected u.data, an .inter file or the ml-100k folder'
    )
  return path


def _read_table(path: pathlib.Path) -> np.ndarray:
  """`[n, 4]` float64 (user, item, rating, timestamp) from u.data or a recbole .inter file."""
  with open(path, encoding='utf-8') as f:
    first = f.readline()
    header = first.rstrip('\n').split('\t')
    if ':' in first:  # recbole's atomic-file header, e.g. 'user_id:token'
      names = [h.split(':', 1)[0] for h in header]
      missing = [c for c in _COLUMNS if c not in names]
      if missing:
        raise ValueError(
          f'{path} has columns {names}; expected {list(_COLUMNS)} (missing {missing})'
        )
      columns = [names.index(c) for c in _COLUMNS]
    else:  # u.data: user item rating timestamp, no header
      f.seek(0)
      names, columns = None, [0, 1, 2, 3]
    try:
      table = np.loadtxt(f, delimiter='\t', dtype=np.float64, ndmin=2)
    except ValueError as e:
      raise ValueError(
        f'{path} is not a tab-separated table of numbers ({e}); expected rows '
        "'user item rating timestamp' as in u.data"
      ) from e
  width = len(names) if names is not None else 4
  if table.shape[1] != width or len(table) == 0:
    raise ValueError(
      f'{path} holds a table of shape {table.shape}; expected (n >= 1, {width}) with columns '
      f'{names or list(_COLUMNS)}'
    )
  return table[:, columns]


def load_movielens_100k(path: str | pathlib.Path | None = None) -> dict[str, np.ndarray]:
  """MovieLens ratings as flat columns, each `[n]` (n = 100,000 for ml-100k), in file order.

  Args:
    path: `u.data` (tab-separated `user item rating timestamp`, no header), a recbole `.inter`
      file, or a folder holding either; default the copy bundled in recbole.

  Returns:
    `{'user_id': int32, 'item_id': int32, 'rating': float32, 'timestamp': int64,
    'raw_user_id': int64, 'raw_item_id': int64}`: ids remapped to 0-based dense indices (module
    docstring), the original ids alongside.
  """
  path = movielens_file(path)
  table = _read_table(path)
  raw_users, raw_items = table[:, 0].astype(np.int64), table[:, 1].astype(np.int64)
  _, user_id = np.unique(raw_users, return_inverse=True)
  _, item_id = np.unique(raw_items, return_inverse=True)
  return {
    'user_id': user_id.astype(np.int32),
    'item_id': item_id.astype(np.int32),
    'rating': table[:, 2].astype(np.float32),
    'timestamp': table[:, 3].astype(np.int64),
    'raw_user_id': raw_users,
    'raw_item_id': raw_items,
  }


def _check_ratings(ratings: dict[str, np.ndarray]) -> None:
  if not isinstance(ratings, dict) or 'user_id' not in ratings or 'timestamp' not in ratings:
    raise ValueError(
      'ratings must be a dict of [n] columns with user_id and timestamp, as load_movielens_100k '
      f'returns; got {type(ratings).__name__}'
      + (f' with keys {sorted(ratings)}' if isinstance(ratings, dict) else '')
    )


def movielens_split(
  ratings: dict[str, np.ndarray], test_fraction: float = 0.2
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
  """Splits each user's ratings in time: the latest `floor(test_fraction · n_user)` go to test.

  Ids stay as they are, so the train and test populations share user and item indices (a
  user with fewer than `1 / test_fraction` ratings has none in test).

  Returns:
    `(train, test)`, dicts of the same columns as `ratings`.
  """
  _check_ratings(ratings)
  if not 0.0 <= test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in [0, 1); got {test_fraction}')
  user, time = np.asarray(ratings['user_id']), np.asarray(ratings['timestamp'])
  order = np.lexsort((np.arange(len(user)), time, user))  # by user, then time, then file order
  sorted_user = user[order]
  starts = np.flatnonzero(np.r_[True, sorted_user[1:] != sorted_user[:-1]])
  counts = np.diff(np.r_[starts, len(user)])
  rank = np.arange(len(user)) - np.repeat(starts, counts)  # position within the user, in time
  n_test = np.repeat(np.floor(counts * test_fraction).astype(np.int64), counts)
  is_test = np.empty(len(user), dtype=bool)
  is_test[order] = rank >= np.repeat(counts, counts) - n_test
  train = {k: np.asarray(v)[~is_test] for k, v in ratings.items()}
  test = {k: np.asarray(v)[is_test] for k, v in ratings.items()}
  return train, test


def movielens_federated(ratings: dict[str, np.ndarray]) -> _federated_data.InMemoryFederatedData:
  """One client per user: the population of `ratings`, naturally partitioned.

  Clients are keyed by the dense `user_id` (an int), in increasing order; a client's examples
  are its ratings in time order and carry every column of `ratings`.

  Example:
    >>> ratings = fl.data.load_movielens_100k()
    >>> train, test = fl.data.movielens_split(ratings, test_fraction=0.2)
    >>> population = fl.data.movielens_federated(train)  # 943 clients
  """
  _check_ratings(ratings)
  user, time = np.asarray(ratings['user_id']), np.asarray(ratings['timestamp'])
  order = np.lexsort((np.arange(len(user)), time, user))
  arrays = {k: np.asarray(v)[order] for k, v in ratings.items()}
  return _federated_data.InMemoryFederatedData.from_arrays(arrays, client_ids=user[order])
