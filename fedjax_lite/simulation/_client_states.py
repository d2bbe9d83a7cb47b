"""Per-client state stores: the state of every client ever sampled, keyed by client id, for
stateful algorithms (SCAFFOLD's control variates, personal models, per-client counters).

A store holds one pytree per client, all shaped like `default` (the state of a client never
seen, e.g. `process.initial_client_state`). `get(ids)` stacks the cohort's states
`[clients, ...]` (the default for a client without a row); `put(ids, stacked)` writes them back.
Clients are keyed by `fl.data.client_key(id)`, a 63-bit int (an int id is its own key; a str or
bytes id is hashed), never by the 32-bit `ClientBatches.client_ids`, which collide at a million
clients. Only clients ever put have a row. A client's state is stored as its leaves' raw bytes
concatenated, so values come back bitwise.

**Checkpoints.** `run_training_process` keeps a store in step with its checkpoints:
`commit(round_num, keep_rounds)` before saving the checkpoint of a round makes the contents
restorable as that round, and `rollback(round_num)` on resume returns to the contents committed
with the restored checkpoint, dropping every later write. `InMemoryClientStateStore` keeps one
snapshot per committed round (files in `directory` when given, so a killed process can resume);
`SQLiteClientStateStore` versions its rows by the round that committed them.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import client_key
from fedjax_lite.simulation import _files


class ClientStateStore(abc.ABC):
  """What every store shares: keys, checks and the byte encoding of client states. A store
  implements `_read`, `_write`, `__len__` (clients with a row), `commit` and `rollback`."""

  def __init__(self, default: Any):
    """Args:
    default: the state of a client never seen: a pytree of arrays without a client axis."""
    self._default = jax.tree.map(np.asarray, jax.device_get(default))
    leaves, self._treedef = jax.tree.flatten(self._default)
    if not leaves:
      raise ValueError('default must be a pytree with at least one array leaf')
    self._leaf_specs = [(leaf.shape, leaf.dtype) for leaf in leaves]
    self._default_row = self._encode(jax.tree.map(lambda x: x[None], self._default))[0]

  @property
  def default(self) -> Any:
    """The state of a client never seen (numpy leaves, no client axis)."""
    return self._default

  def get(self, ids: Sequence[Any]) -> Any:
    """The states of `ids` stacked in their order: numpy leaves `[len(ids), ...]`."""
    rows = self._read(client_keys(ids))
    return self._decode([self._default_row if row is None else row for row in rows])

  def put(self, ids: Sequence[Any], stacked: Any) -> None:
    """Stores `stacked` (leaves `[len(ids), ...]`, like `get` returns) as the states of `ids`."""
    keys = client_keys(ids)
    if len(set(keys)) != len(keys):
      raise ValueError('ids has duplicates (after fl.data.client_key); put each client once')
    stacked = jax.tree.map(np.asarray, jax.device_get(stacked))
    if jax.tree.structure(stacked) != self._treedef:
      raise ValueError(
        f'stacked has tree structure {jax.tree.structure(stacked)}; expected {self._treedef} '
        'like the default'
      )
    paths = jax.tree_util.tree_flatten_with_path(stacked)[0]
    for (path, leaf), (shape, dtype) in zip(paths, self._leaf_specs, strict=True):
      if leaf.shape != (len(keys), *shape) or leaf.dtype != dtype:
        raise ValueError(
          f'stacked leaf {tree_lib.keystr(path)} is {leaf.dtype.name}{list(leaf.shape)}; '
          f'expected {dtype.name}{[len(keys), *shape]}: one state per id, like the default'
        )
    self._write(keys, self._encode(stacked))

  def _encode(self, stacked: Any) -> list[bytes]:
    leaves = jax.tree.leaves(stacked)
    n = leaves[0].shape[0]
    columns = [np.ascontiguousarray(x).reshape(n, -1).view(np.uint8) for x in leaves]
    return [row.tobytes() for row in np.concatenate(columns, axis=1)]

  def _decode(self, rows: list[bytes]) -> Any:
    table = np.frombuffer(b''.join(rows), np.uint8).reshape(len(rows), len(self._default_row))
    leaves, start = [], 0
    for shape, dtype in self._leaf_specs:
      width = int(np.prod(shape)) * dtype.itemsize
      column = np.ascontiguousarray(table[:, start : start + width])
      leaves.append(column.view(dtype).reshape(len(rows), *shape))
      start += width
    return jax.tree.unflatten(self._treedef, leaves)

  def _spec_json(self) -> str:
    return json.dumps([[list(shape), dtype.str] for shape, dtype in self._leaf_specs])

  @abc.abstractmethod
  def __len__(self) -> int: ...

  @abc.abstractmethod
  def _read(self, keys: list[int]) -> list[bytes | None]:
    """Each key's row, None for a client without one."""

  @abc.abstractmethod
  def _write(self, keys: list[int], rows: list[bytes]) -> None: ...

  @abc.abstractmethod
  def commit(self, round_num: int, keep_rounds: Iterable[int] = ()) -> None:
    """Makes the current contents restorable as `round_num`; forgets what only rounds not in
    `keep_rounds` (and not `round_num`) would restore."""

  @abc.abstractmethod
  def rollback(self, round_num: int) -> None:
    """Returns to the contents committed as `round_num` (round 0 never committed: empty)."""


def client_keys(ids: Any) -> list[int]:
  """63-bit `client_key`s of a sequence of client ids (int, str or bytes)."""
  if isinstance(ids, str | bytes) or not isinstance(ids, Sequence | np.ndarray):
    raise TypeError(f'ids must be a sequence of client ids; got {type(ids).__name__}')
  keys = []
  for i, client_id in enumerate(ids):
    try:
      keys.append(client_key(client_id))
    except TypeError:
      raise TypeError(
        f'ids[{i}] is {type(client_id).__name__}; client ids must be int, str or bytes (the '
        'real ids, or fl.data.client_key of them)'
      ) from None
  return keys


class InMemoryClientStateStore(ClientStateStore):
  """Client states in a dict; one snapshot per committed round.

  Snapshots share the stored bytes (a commit copies the dict, not the states). With `directory`
  each commit also writes `client_states_<round>.npz` there (atomically; keys `[n] int64` and
  rows `[n, bytes] uint8`), so a killed run resumes from the files; put it beside the
  checkpoints. Memory and snapshot files grow with the clients touched: for large populations
  use `SQLiteClientStateStore`.

  Example:
    >>> store = fl.simulation.InMemoryClientStateStore(process.initial_client_state, 'run/ckpt')
    >>> fl.simulation.run_training_process(process, select, 100, client_state_store=store,
    ...     cohort_ids_fn=cohort_ids, checkpoint_manager=manager)
  """

  def __init__(self, default: Any, directory: str | os.PathLike | None = None):
    super().__init__(default)
    self._rows: dict[int, bytes] = {}
    self._snapshots: dict[int, dict[int, bytes]] = {}
    self._directory = None if directory is None else os.fspath(directory)

  def __len__(self) -> int:
    return len(self._rows)

  def _read(self, keys):
    return [self._rows.get(k) for k in keys]

  def _write(self, keys, rows):
    self._rows.update(zip(keys, rows, strict=True))

  def _path(self, round_num: int) -> str:
    return os.path.join(self._directory, f'client_states_{round_num}.npz')

  def commit(self, round_num, keep_rounds=()):
    keep = {*keep_rounds, round_num}
    self._snapshots = {r: s for r, s in self._snapshots.items() if r in keep}
    self._snapshots[round_num] = dict(self._rows)
    if self._directory is None:
      return
    buffer = io.BytesIO()
    keys = np.fromiter(self._rows, np.int64, len(self._rows))
    rows = np.frombuffer(b''.join(self._rows.values()), np.uint8)
    rows = rows.reshape(len(keys), len(self._default_row))
    np.savez(buffer, keys=keys, rows=rows, spec=np.array(self._spec_json()))
    _files.atomic_write(self._path(round_num), buffer.getvalue())
    for name in os.listdir(self._directory):
      match = re.fullmatch(r'client_states_(\d+)\.npz', name)
      if match and int(match.group(1)) not in keep:
        os.remove(os.path.join(self._directory, name))

  def rollback(self, round_num):
    if round_num in self._snapshots:
      self._rows = dict(self._snapshots[round_num])
    elif self._directory is not None and os.path.exists(self._path(round_num)):
      with np.load(self._path(round_num)) as snapshot:
        if str(snapshot['spec']) != self._spec_json():
          raise ValueError(
            f'{self._path(round_num)} holds client states of another shape than the default'
          )
        self._rows = dict(zip(snapshot['keys'].tolist(), map(bytes, snapshot['rows']), strict=True))
    elif round_num == 0:
      self._rows = {}
    else:
      raise FileNotFoundError(
        f'no client states committed for round {round_num}. Tip: give the store a directory '
        '(beside the checkpoints) so that a killed run can resume.'
      )
    self._snapshots = {r: s for r, s in self._snapshots.items() if r <= round_num}


_PENDING = 2**62  # the version of rows put since the last commit


class SQLiteClientStateStore(ClientStateStore):
  """Client states in one SQLite file, a row per client ever put: a million-client population
  costs only the clients sampled.

  Table `states(key, version, value)`: `key` the client's 63-bit key, `value` its state's bytes,
  `version` the round whose commit wrote it. Puts since the last commit are rows of a pending
  version inside an open transaction (a killed process loses them, as it loses the round).
  `get` reads each client's newest row. `commit(r, keep_rounds)` stamps the pending rows with
  r, commits, and deletes the rows no kept round reads; `rollback(r)` deletes every row newer
  than r. Table `meta` records the states' shapes and dtypes, checked when the file is reopened.

  Example:
    >>> store = fl.simulation.SQLiteClientStateStore('run/client_states.sqlite',
    ...     process.initial_client_state)
  """

  def __init__(self, path: str | os.PathLike, default: Any):
    super().__init__(default)
    self._path = os.fspath(path)
    self._db = sqlite3.connect(self._path)
    self._db.execute('CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT)')
    self._db.execute(
      'CREATE TABLE IF NOT EXISTS states (key INTEGER, version INTEGER, value BLOB, '
      'PRIMARY KEY (key, version)) WITHOUT ROWID'
    )
    self._db.execute("INSERT OR IGNORE INTO meta VALUES ('spec', ?)", (self._spec_json(),))
    (spec,) = self._db.execute("SELECT value FROM meta WHERE name = 'spec'").fetchone()
    self._db.commit()
    if spec != self._spec_json():
      self._db.close()
      raise ValueError(
        f'{self._path} holds client states shaped {spec} ([shape, dtype] per leaf); the default '
        f'is {self._spec_json()}. Tip: use another file for another algorithm or model.'
      )

  @property
  def path(self) -> str:
    return self._path

  def __len__(self) -> int:
    return self._db.execute('SELECT COUNT(DISTINCT key) FROM states').fetchone()[0]

  def _read(self, keys):
    query = 'SELECT value FROM states WHERE key = ? ORDER BY version DESC LIMIT 1'
    return [(self._db.execute(query, (k,)).fetchone() or (None,))[0] for k in keys]

  def _write(self, keys, rows):
    self._db.executemany(
      'INSERT OR REPLACE INTO states VALUES (?, ?, ?)',
      [(k, _PENDING, row) for k, row in zip(keys, rows, strict=True)],
    )

  def commit(self, round_num, keep_rounds=()):
    self._db.execute(
      'UPDATE OR REPLACE states SET version = ? WHERE version = ?', (round_num, _PENDING)
    )
    kept = sorted({*keep_rounds, round_num})
    # A row is read by round k if it is its client's newest row at or before k.
    self._db.execute(
      'DELETE FROM states WHERE (key, version) IN (SELECT key, version FROM (SELECT key, version,'
      ' LEAD(version) OVER (PARTITION BY key ORDER BY version) AS newer FROM states)'
      ' WHERE newer IS NOT NULL AND NOT EXISTS (SELECT 1 FROM json_each(?)'
      ' WHERE value >= version AND value < newer))',
      (json.dumps(kept),),
    )
    self._db.commit()

  def rollback(self, round_num):
    self._db.rollback()
    self._db.execute('DELETE FROM states WHERE version > ?', (round_num,))
    self._db.commit()

  def close(self) -> None:
    """Closes the file; puts since the last commit are lost."""
    self._db.close()
