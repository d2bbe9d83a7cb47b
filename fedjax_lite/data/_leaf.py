"""LEAF's JSON populations (Caldas et al., 2018: FEMNIST, Shakespeare, Sent140, ...).

A LEAF split is one or more `.json` files, each
`{"users": [...], "num_samples": [...], "user_data": {user: {"x": [...], "y": [...]}}}` (and an
optional `"hierarchies"`), e.g. `leaf/data/femnist/data/train/*.json` after LEAF's
`preprocess.sh`. The files are read whole (JSON cannot be read lazily) into an
`InMemoryFederatedData`.
"""

from __future__ import annotations

import json
import pathlib
from typing import Any

import numpy as np

from fedjax_lite.data import _federated_data


def _json_files(path: pathlib.Path) -> list[pathlib.Path]:
  if path.is_file():
    return [path]
  if path.is_dir():
    files = sorted(p for p in path.iterdir() if p.suffix == '.json' and p.is_file())
    if files:
      return files
    raise FileNotFoundError(f'directory {str(path)!r} holds no .json file; expected LEAF JSON')
  raise FileNotFoundError(f'path {str(path)!r} does not exist; expected a LEAF .json file or dir')


def _to_array(values: list[Any]) -> np.ndarray:
  """Numbers become float32 / int32 arrays, text an object array of `str`, ragged lists objects."""
  try:
    array = np.asarray(values)
  except ValueError:  # ragged nested lists (e.g. token lists of different lengths)
    array = np.empty(len(values), dtype=object)
    for i, v in enumerate(values):
      array[i] = v
  if array.dtype.kind == 'f':
    return array.astype(np.float32)
  if array.dtype.kind in 'iu' and (array.size == 0 or np.abs(array).max() < 2**31):
    return array.astype(np.int32)
  if array.dtype.kind == 'U':
    return array.astype(object)
  return array


def load_leaf(path: str | pathlib.Path) -> _federated_data.InMemoryFederatedData:
  """A LEAF split as a population: one client per user, features as in the files (`x`, `y`).

  Clients come in the order of `users`, files taken in name order; users without examples are
  left out. Numbers become float32 / int32 arrays (FEMNIST: `x [n, 784]` float32 in [0, 1] with
  1.0 the background, `y [n]` int32 in 0..61), text an object array of `str` (Shakespeare: `x`
  80-character windows, `y` the next character).

  Args:
    path: a LEAF `.json` file, or a directory of them (one split, e.g. `.../data/train`).

  Raises:
    FileNotFoundError: no such file, or a directory without `.json` files.
    ValueError: a file is not LEAF JSON, `num_samples` disagrees with the data, or a user
      appears twice.
  """
  users: list[Any] = []
  columns: dict[str, list[Any]] = {}
  seen: dict[Any, pathlib.Path] = {}
  for file in _json_files(pathlib.Path(path)):
    try:
      with open(file, encoding='utf-8') as f:
        content = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      raise ValueError(f'{file} is not valid JSON ({e})') from e
    if not isinstance(content, dict) or not {'users', 'user_data'} <= set(content):
      keys = sorted(content) if isinstance(content, dict) else type(content).__name__
      raise ValueError(f"{file} has keys {keys}; expected LEAF's users, num_samples, user_data")
    num_samples = content.get('num_samples', [None] * len(content['users']))
    if len(num_samples) != len(content['users']):
      raise ValueError(
        f'{file} lists {len(content["users"])} users but {len(num_samples)} num_samples'
      )
    for user, declared in zip(content['users'], num_samples, strict=True):
      if user in seen:
        raise ValueError(f'user {user!r} appears in both {seen[user]} and {file}')
      seen[user] = file
      data = content['user_data'].get(user)
      if not isinstance(data, dict) or not data:
        raise ValueError(f'{file}: user {user!r} has no entry in user_data')
      lengths = {k: len(v) for k, v in data.items()}
      if len(set(lengths.values())) != 1 or declared not in (None, *lengths.values()):
        raise ValueError(
          f'{file}: user {user!r} declares num_samples={declared} but has lengths {lengths}'
        )
      if set(data) != set(columns) and columns:
        raise ValueError(
          f'{file}: user {user!r} has keys {sorted(data)}; expected {sorted(columns)}'
        )
      for k, v in data.items():
        columns.setdefault(k, []).extend(v)
      users.extend([user] * next(iter(lengths.values())))
  if not users:
    raise ValueError(f'{path} holds no examples')
  arrays = {k: _to_array(v) for k, v in columns.items()}
  # Each user's examples are contiguous, so a client is a slice of the flat arrays.
  ids = np.asarray(users, dtype=object)
  starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
  ends = np.r_[starts[1:], len(ids)]
  clients = {
    ids[s]: {k: a[s:e] for k, a in arrays.items()} for s, e in zip(starts, ends, strict=True)
  }
  return _federated_data.InMemoryFederatedData(clients)
