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

**Integrity** (as the SQLite population file's). A store kept in files knows which rounds it can
restore and keeps its states under checksums: `SQLiteClientStateStore` a CRC-32 of every
client's state (over its key and bytes, checked on every read) and one of its index (checked on
opening); the in-memory store's snapshot files the zip format's CRC-32 of each array (checked on
loading). A flipped byte, a truncated file, or a store that is missing, emptied or behind the
checkpoint being resumed raises `ClientStateStoreError` naming the file (and the client), and
nothing damaged is ever used: a resumed SCAFFOLD run without its client states would restart
every control variate at zero while the server's carries on.
"""

from __future__ import annotations

import abc
import io
import json
import os
import re
import sqlite3
import zipfile
import zlib
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import client_key
from fedjax_lite.simulation import _files


class ClientStateStoreError(OSError):
  """A client state store's file is damaged, or not in step with the checkpoint being resumed
  (missing, emptied, behind it, or of another run). An `OSError`, like a missing file: the
  command reports it in one line."""

  def __init__(self, message: str):
    super().__init__(message)  # one argument: the message is the whole text


_TIP_START_OVER = (
  'Tip: restore the client state file saved with the checkpoints, or start the run over in a '
  'fresh folder.'
)


def _row_crc(key: int, row: bytes) -> int:
  """CRC-32 of a stored state: its client's key (8 bytes, little-endian) then its bytes."""
  return zlib.crc32(row, zlib.crc32(key.to_bytes(8, 'little')))


class ClientStateStore(abc.ABC):
  """The per-client states a driver threads through the rounds (`run_training_process`,
  `run_sweep`): `get`/`put` a cohort's states, `commit`/`rollback` with the checkpoints, the
  number of clients stored, and the `default` state of a client never seen."""

  def __init__(self, default: Any):
    """Args:
    default: the state of a client never seen: a pytree of arrays without a client axis."""
    self._default = jax.tree.map(np.asarray, jax.device_get(default))
    if not jax.tree.leaves(self._default):
      raise ValueError('default must be a pytree with at least one array leaf')

  @property
  def default(self) -> Any:
    """The state of a client never seen (numpy leaves, no client axis)."""
    return self._default

  @abc.abstractmethod
  def get(self, ids: Sequence[Any]) -> Any:
    """The states of `ids` stacked in their order: leaves `[len(ids), ...]`."""

  @abc.abstractmethod
  def put(self, ids: Sequence[Any], stacked: Any) -> None:
    """Stores `stacked` (leaves `[len(ids), ...]`, like `get` returns) as the states of `ids`."""

  @abc.abstractmethod
  def __len__(self) -> int: ...

  @abc.abstractmethod
  def commit(self, round_num: int, keep_rounds: Iterable[int] = ()) -> None:
    """Makes the current contents restorable as `round_num`; forgets what only rounds not in
    `keep_rounds` (and not `round_num`) would restore."""

  @abc.abstractmethod
  def rollback(self, round_num: int) -> None:
    """Returns to the contents committed as `round_num` (round 0 never committed: empty).

    Raises:
      ClientStateStoreError: round `round_num` (> 0) was never committed to this store, or its
        contents are damaged.
    """


class _RowStore(ClientStateStore):
  """A store of one byte row per client: keys, checks and the byte encoding of client states.
  A row store implements `_read`, `_write`, `__len__` (clients with a row), `commit` and
  `rollback`."""

  def __init__(self, default: Any):
    super().__init__(default)
    leaves, self._treedef = jax.tree.flatten(self._default)
    self._leaf_specs = [(leaf.shape, leaf.dtype) for leaf in leaves]
    self._default_row = self._encode(jax.tree.map(lambda x: x[None], self._default))[0]

  def get(self, ids: Sequence[Any]) -> Any:
    """The states of `ids` stacked in their order: numpy leaves `[len(ids), ...]`."""
    rows = self._read(client_keys(ids), ids)
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
  def _read(self, keys: list[int], ids: Sequence[Any]) -> list[bytes | None]:
    """Each key's row, None for a client without one (`ids`, the keys' ids, name a damaged
    row)."""

  @abc.abstractmethod
  def _write(self, keys: list[int], rows: list[bytes]) -> None: ...


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


class InMemoryClientStateStore(_RowStore):
  """Client states in a dict; one snapshot per committed round.

  Snapshots share the stored bytes (a commit copies the dict, not the states). With `directory`
  each commit also writes `client_states_<round>.npz` there (atomically; keys `[n] int64` and
  rows `[n, bytes] uint8`, each array under the zip format's CRC-32, checked when a resumed run
  reads the file), so a killed run resumes from the files; put it beside the checkpoints.
  Memory and snapshot files grow with the clients touched: for large populations use
  `SQLiteClientStateStore`.

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

  def _read(self, keys, ids):
    del ids  # rows in memory are checked when they are loaded from a file
    return [self._rows.get(k) for k in keys]

  def _write(self, keys, rows):
    self._rows.update(zip(keys, rows, strict=True))

  def _path(self, round_num: int) -> str:
    return os.path.join(self._directory, f'client_states_{round_num}.npz')

  def commit(self, round_num, keep_rounds=()):
    later = [r for r in self._snapshots if r > round_num]
    if later:
      raise ClientStateStoreError(
        f'this store holds client states committed as round {max(later)}; committing round '
        f'{round_num} would leave them newer than it. Tip: a resumed run rolls the store back '
        'first (run_training_process does); a run started over needs a fresh store.'
      )
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
      self._rows = self._load(self._path(round_num))
    elif round_num == 0:
      self._rows = {}
    else:
      where = '' if self._directory is None else f' (no {self._path(round_num)})'
      tip = (
        'Tip: give the store a directory (beside the checkpoints) so that a killed run can resume.'
        if self._directory is None
        else _TIP_START_OVER
      )
      raise ClientStateStoreError(
        f'no client states committed for round {round_num}{where}, the round being resumed: '
        f'every client state would restart from the default while the server state carries on. '
        f'{tip}'
      )
    self._snapshots = {r: s for r, s in self._snapshots.items() if r <= round_num}

  def _load(self, path: str) -> dict[int, bytes]:
    """The rows of a snapshot file (each array checked against its CRC-32 by `zipfile`)."""

    def damaged(why: str) -> ClientStateStoreError:
      return ClientStateStoreError(f'{path} is damaged: {why}. {_TIP_START_OVER}')

    try:
      with np.load(path) as snapshot:
        spec, keys, rows = str(snapshot['spec']), snapshot['keys'], snapshot['rows']
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zlib.error) as e:
      raise damaged(f'it cannot be read ({type(e).__name__}: {e})') from e
    if spec != self._spec_json():
      raise ValueError(f'{path} holds client states of another shape than the default')
    width = len(self._default_row)
    if keys.ndim != 1 or rows.shape != (len(keys), width) or rows.dtype != np.uint8:
      raise damaged(
        f'it holds keys {keys.dtype.name}{list(keys.shape)} and rows '
        f'{rows.dtype.name}{list(rows.shape)}; expected uint8[{len(keys)}, {width}]'
      )
    return dict(zip(keys.tolist(), map(bytes, rows), strict=True))


_PENDING = 2**62  # the version of rows put since the last commit
_FORMAT = 'fedjax_lite.SQLiteClientStateStore'
_VERSION = '2'  # version 1 (no format row) had no checksums and no record of committed rounds
# The index checksum: an aggregate over every row, order-independent (SQLite has no XOR
# aggregate), its terms small enough that the sums never overflow an int64.
_INDEX_SQL = (
  'SELECT COUNT(*), COALESCE(SUM(key % 2147483647), 0), COALESCE(SUM(version), 0), '
  'COALESCE(SUM(crc), 0) FROM states'
)


class SQLiteClientStateStore(_RowStore):
  """Client states in one SQLite file, a row per client ever put: a million-client population
  costs only the clients sampled.

  Table `states(key, version, value, crc)`: `key` the client's 63-bit key, `value` its state's
  bytes, `version` the round whose commit wrote it, `crc` the CRC-32 of key and value, checked
  on every read. Puts since the last commit are rows of a pending version inside an open
  transaction (a killed process loses them, as it loses the round). `get` reads each client's
  newest row. `commit(r, keep_rounds)` stamps the pending rows with r, commits, and deletes the
  rows no kept round reads; `rollback(r)` deletes every row newer than r.

  Table `meta` records the format, the states' shapes and dtypes (checked when the file is
  reopened), the rounds the file can restore (`rounds`, JSON) and a checksum of the rows' keys,
  versions and CRCs (`index`), all under one CRC-32 (`crc`). Opening checks them, so a truncated
  or altered file is refused before anything is read from it; `rollback(r)` of a round the file
  never committed (a file deleted, emptied, or older than the checkpoint) is refused, as is a
  commit older than the file's last. `verify()` checks every row.

  Example:
    >>> store = fl.simulation.SQLiteClientStateStore('run/client_states.sqlite',
    ...     process.initial_client_state)

  Raises:
    ClientStateStoreError: the file is damaged (not SQLite, truncated, a checksum fails).
    ValueError: the file holds states of another shape or dtype than `default`.
  """

  def __init__(self, path: str | os.PathLike, default: Any):
    super().__init__(default)
    self._path = os.fspath(path)
    self._db = sqlite3.connect(self._path)
    try:
      self._open()
    except BaseException:
      self._db.close()
      raise

  def _sql(self, sql: str, params: Any = (), *, many: bool = False) -> sqlite3.Cursor:
    """Runs a statement; SQLite's errors become `ClientStateStoreError`s naming the file."""
    try:
      return (self._db.executemany if many else self._db.execute)(sql, params)
    except sqlite3.DatabaseError as e:
      raise ClientStateStoreError(
        f'{self._path} cannot be used as a client state store: {e} (SQLite). {_TIP_START_OVER}'
      ) from e

  def _damaged(self, why: str) -> ClientStateStoreError:
    return ClientStateStoreError(f'{self._path} is damaged: {why}. {_TIP_START_OVER}')

  def _open(self) -> None:
    tables = {r[0] for r in self._sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
    if not tables:  # a new (or emptied) file, set up in one transaction
      self._sql('BEGIN')
      self._sql('CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)')
      self._sql(
        'CREATE TABLE states (key INTEGER, version INTEGER, value BLOB, crc INTEGER, '
        'PRIMARY KEY (key, version)) WITHOUT ROWID'
      )
      self._sql(
        'INSERT INTO meta VALUES (?, ?)',
        [('format', _FORMAT), ('version', _VERSION), ('spec', self._spec_json())],
        many=True,
      )
      self._rounds: list[int] = []
      self._write_meta()
      self._db.commit()
      return
    meta = dict(self._sql('SELECT name, value FROM meta').fetchall()) if 'meta' in tables else {}
    if meta.get('format') is None and 'spec' in meta:
      raise ClientStateStoreError(
        f'{self._path} was written by an earlier fedjax_lite, without checksums or a record of '
        'the rounds it holds, so it cannot be checked against the checkpoints. ' + _TIP_START_OVER
      )
    if meta.get('format') != _FORMAT or meta.get('version') != _VERSION:
      raise self._damaged(
        f'its meta table has format={meta.get("format")!r} version={meta.get("version")!r}; '
        f'expected format={_FORMAT!r} version={_VERSION!r}'
      )
    if str(_meta_crc(meta)) != meta.get('crc'):
      raise self._damaged('its meta table does not match the checksum it was written with')
    if meta['spec'] != self._spec_json():
      raise ValueError(
        f'{self._path} holds client states shaped {meta["spec"]} ([shape, dtype] per leaf); '
        f'the default is {self._spec_json()}. Tip: use another file for another algorithm or '
        'model.'
      )
    self._rounds = json.loads(meta['rounds'])
    index = list(self._sql(_INDEX_SQL).fetchone())
    if index != json.loads(meta['index']):
      raise self._damaged(
        f'its rows (count, keys, versions, checksums {index}) do not match the index it was '
        f'committed with ({meta["index"]}): rows were lost, truncated or altered'
      )

  def _write_meta(self) -> None:
    """Records the restorable rounds and the rows' index checksum (inside the transaction)."""
    meta = {
      'format': _FORMAT,
      'version': _VERSION,
      'spec': self._spec_json(),
      'rounds': json.dumps(self._rounds),
      'index': json.dumps(list(self._sql(_INDEX_SQL).fetchone())),
    }
    meta['crc'] = str(_meta_crc(meta))
    self._sql('INSERT OR REPLACE INTO meta VALUES (?, ?)', list(meta.items()), many=True)

  @property
  def path(self) -> str:
    return self._path

  @property
  def committed_rounds(self) -> list[int]:
    """The rounds this file can restore (`rollback`), ascending."""
    return list(self._rounds)

  def __len__(self) -> int:
    return self._sql('SELECT COUNT(DISTINCT key) FROM states').fetchone()[0]

  def _read(self, keys, ids):
    query = 'SELECT value, crc FROM states WHERE key = ? ORDER BY version DESC LIMIT 1'
    rows = []
    for key, client_id in zip(keys, ids, strict=True):
      found = self._sql(query, (key,)).fetchone()
      if found is not None:
        self._check_row(f'client {client_id!r}', key, *found)
      rows.append(None if found is None else found[0])
    return rows

  def _check_row(self, client: str, key: int, value: Any, crc: Any) -> None:
    width = len(self._default_row)
    if not isinstance(value, bytes) or len(value) != width:
      got = f'{len(value)} bytes' if isinstance(value, bytes) else repr(value)
      raise self._damaged(
        f'the state of {client} holds {got}; expected {width} bytes like the default'
      )
    if _row_crc(key, value) != crc:
      raise self._damaged(f'the state of {client} does not match its checksum')

  def _write(self, keys, rows):
    self._sql(
      'INSERT OR REPLACE INTO states VALUES (?, ?, ?, ?)',
      [(k, _PENDING, row, _row_crc(k, row)) for k, row in zip(keys, rows, strict=True)],
      many=True,
    )

  def commit(self, round_num, keep_rounds=()):
    if self._rounds and round_num < self._rounds[-1]:
      raise ClientStateStoreError(
        f'{self._path} holds client states committed as round {self._rounds[-1]}; committing '
        f'round {round_num} would leave them newer than it (the file is of another run, or of '
        'this one before it was started over). Tip: delete it, or start the run in a fresh '
        'folder.'
      )
    self._sql('UPDATE OR REPLACE states SET version = ? WHERE version = ?', (round_num, _PENDING))
    kept = sorted({*keep_rounds, round_num})
    # A row is read by round k if it is its client's newest row at or before k.
    self._sql(
      'DELETE FROM states WHERE (key, version) IN (SELECT key, version FROM (SELECT key, version,'
      ' LEAD(version) OVER (PARTITION BY key ORDER BY version) AS newer FROM states)'
      ' WHERE newer IS NOT NULL AND NOT EXISTS (SELECT 1 FROM json_each(?)'
      ' WHERE value >= version AND value < newer))',
      (json.dumps(kept),),
    )
    self._rounds = sorted({r for r in self._rounds if r in kept} | {round_num})
    self._write_meta()
    self._db.commit()

  def rollback(self, round_num):
    self._db.rollback()
    if round_num not in self._rounds and round_num != 0:
      if not self._rounds:
        state = 'has no client states committed (a new, deleted or emptied file)'
      elif self._rounds[-1] < round_num:
        state = f'holds client states up to round {self._rounds[-1]} only'
      else:
        state = f'can restore rounds {self._rounds}, not round {round_num}'
      raise ClientStateStoreError(
        f'{self._path} {state}, but the checkpoint being resumed is of round {round_num}: every '
        'client state would restart from the default while the server state carries on. '
        + _TIP_START_OVER
      )
    self._sql('DELETE FROM states WHERE version > ?', (round_num,))
    self._rounds = [r for r in self._rounds if r <= round_num]
    self._write_meta()
    self._db.commit()

  def verify(self) -> None:
    """Checks the whole file: SQLite's integrity check, then every stored state's checksum.

    Raises:
      ClientStateStoreError: naming the damage (SQLite's report, or the first client that
        fails, by its key `fl.data.client_key(id)`).
    """
    report = self._sql('PRAGMA integrity_check').fetchall()
    if report != [('ok',)]:
      raise self._damaged('; '.join(str(r[0]) for r in report[:5]))
    for key, value, crc in self._sql('SELECT key, value, crc FROM states'):
      self._check_row(f'the client with key {key}', key, value, crc)

  def close(self) -> None:
    """Closes the file; puts since the last commit are lost."""
    self._db.close()


def _meta_crc(meta: dict[str, str]) -> int:
  """CRC-32 of the meta rows that `crc` covers."""
  names = ('format', 'version', 'spec', 'rounds', 'index')
  return zlib.crc32(json.dumps([meta.get(n) for n in names]).encode())
