"""`SQLiteFederatedData`: a population stored in one SQLite file, read one client at a time.

A population is built once from any `FederatedData` (`SQLiteFederatedData.build(source, path)`)
and then opened read-only with random access per client, so it may be far larger than memory:
opening reads only the client ids and sizes, never the arrays.

File layout (format version 2; stdlib `sqlite3`):

- `meta(key, value)`: `format` = `fedjax_lite.SQLiteFederatedData`, `version` = `2`,
  `num_clients`, `index_crc` (CRC-32 of the `clients` rows, checked on open).
- `features(position, name, dtype, shape)`: one row per feature; `dtype` is numpy's `dtype.str`
  (`<f4`, `|b1`, ...), `shape` the per-example shape as JSON (`[28, 28]`; `[]` for scalars).
- `clients(idx, id, num_examples, crc)`: one row per client in `client_ids` order. `id` has no
  declared type, so SQLite keeps each id's own type (`integer` or `text`) and ids come back
  exactly. `crc` is the CRC-32 of the client's feature bytes in column order, checked on every
  read: a flipped byte or a truncated page is an error naming the client, never altered data.
- `data(idx, f0, f1, ...)`: one row per client; column `f{position}` holds that feature's array
  `[num_examples, *shape]` as C-order bytes. Kept apart from `clients` so that opening scans the
  small index table and no array page.

Version 1 files (no checksums) are still read, unchecked; `verify()` checks a whole file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import pathlib
import sqlite3
import threading
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from fedjax_lite.data._federated_data import ClientDataset, FederatedData, check_client_dataset

_FORMAT = 'fedjax_lite.SQLiteFederatedData'
_VERSION = 2
_READABLE_VERSIONS = ('1', '2')  # version 1 has no checksums
# Rows and bytes of arrays per executemany while building: bounds memory, amortises the calls.
_BATCH_ROWS = 1024
_BATCH_BYTES = 32 << 20
# dtype kinds whose bytes are the values (object arrays hold pointers; structured dtypes lose
# their fields in `dtype.str`).
_STORABLE_KINDS = 'biufcSUmM'
_INT64_RANGE = (-(2**63), 2**63)
# Clients per `IN (...)` query (SQLite builds before 3.32 allow 999 parameters).
_MAX_PARAMS = 900


def _id_key(client_id: Any) -> int | str:
  """The SQLite value of a client id: a Python int or str; anything else is a TypeError."""
  if isinstance(client_id, bool | np.bool_) or not isinstance(client_id, int | np.integer | str):
    raise TypeError(
      f'client ids must be str or int to be stored in SQLite; got {type(client_id).__name__} '
      f'{client_id!r}'
    )
  if isinstance(client_id, str):
    try:
      client_id.encode()
    except UnicodeEncodeError as e:
      raise ValueError(f'str client ids must be valid UTF-8 text; got {client_id!r}') from e
    return str(client_id)
  key = int(client_id)
  if not _INT64_RANGE[0] <= key < _INT64_RANGE[1]:
    raise ValueError(f'int client ids must fit in int64 to be stored in SQLite; got {key}')
  return key


def _describe(dtype: np.dtype, shape: tuple[int, ...]) -> str:
  return f'{dtype}{list(shape)}'


class _Connection:
  """A read-only connection shared by a population and its `preprocess_client` views.

  One lock serialises queries, so any thread may read (the prefetch thread included).
  """

  def __init__(self, conn: sqlite3.Connection):
    self.conn: sqlite3.Connection | None = conn
    self.lock = threading.Lock()

  def fetchall(self, path: str, sql: str, params: Sequence[Any] = ()) -> list[tuple]:
    with self.lock:
      if self.conn is None:
        raise ValueError(f'SQLiteFederatedData({path!r}) is closed')
      try:
        return self.conn.execute(sql, params).fetchall()
      except sqlite3.DatabaseError as e:
        raise ValueError(f'{path} is corrupt: {e}') from e

  def close(self) -> None:
    with self.lock:
      if self.conn is not None:
        self.conn.close()
        self.conn = None


class SQLiteFederatedData(FederatedData):
  """A population in an SQLite file, opened read-only with random access per client.

  Opening reads the ids and sizes of every client (one query on a small table), never the
  arrays; `get_client` reads one client with one indexed query. Safe to read from several threads
  (queries are serialised by a lock). `preprocess_client` views share the connection, so
  `close()` on any of them closes all.

  Example:
    >>> data = SQLiteFederatedData.build(fl.data.InMemoryFederatedData(clients), 'pop.sqlite')
    >>> with SQLiteFederatedData('pop.sqlite') as data:
    ...   cohort = fl.data.sample_cohort(data.num_clients, 100, round_num=0)
    ...   datasets = data.get_clients([data.client_ids[i] for i in cohort])

  Args:
    path: the file written by `SQLiteFederatedData.build`.
    preprocess: per-client hooks, as in `FederatedData`.

  Raises:
    FileNotFoundError: no file at `path`.
    ValueError: the file is not SQLite, or not a fedjax_lite population of this format version.
  """

  def __init__(
    self,
    path: str | os.PathLike,
    preprocess: Sequence[Callable[[ClientDataset], ClientDataset]] = (),
  ):
    super().__init__(preprocess)
    self._path = os.fspath(path)
    if not os.path.isfile(self._path):
      raise FileNotFoundError(
        f'no SQLite population at {self._path!r}; build one with SQLiteFederatedData.build'
      )
    uri = pathlib.Path(self._path).absolute().as_uri() + '?mode=ro'
    conn = sqlite3.connect(uri, uri=True, check_same_thread=False)
    try:
      self._load_index(conn)
    except BaseException:
      conn.close()
      raise
    self._conn = _Connection(conn)

  def _load_index(self, conn: sqlite3.Connection) -> None:
    def invalid(why: str) -> ValueError:
      return ValueError(f'{self._path} is not a fedjax_lite SQLite population: {why}')

    try:
      meta = dict(conn.execute('SELECT key, value FROM meta'))
      if meta.get('format') != _FORMAT or meta.get('version') not in _READABLE_VERSIONS:
        raise invalid(
          f'meta has format={meta.get("format")!r} version={meta.get("version")!r}; expected '
          f'format={_FORMAT!r} version in {_READABLE_VERSIONS}'
        )
      features = conn.execute('SELECT name, dtype, shape FROM features ORDER BY position')
      features = features.fetchall()
      checked = meta['version'] != '1'
      crc_column = ', crc' if checked else ''
      rows = conn.execute(f'SELECT id, num_examples{crc_column} FROM clients ORDER BY idx')
      rows = rows.fetchall()
    except sqlite3.DatabaseError as e:
      raise invalid(str(e)) from e
    if checked and str(_index_crc(rows)) != meta.get('index_crc'):
      raise ValueError(
        f'{self._path} is corrupt: its client index (ids, sizes, checksums) does not match the '
        'checksum it was written with'
      )
    self._crcs = [row[2] for row in rows] if checked else None
    try:
      self._features = [(n, np.dtype(d), tuple(json.loads(s))) for n, d, s in features]
    except (TypeError, ValueError) as e:
      raise invalid(f'bad features table {features}: {e}') from e
    if not self._features:
      raise invalid('the features table is empty')
    self._ids = [row[0] for row in rows]
    self._sizes = np.array([row[1] for row in rows], np.int64)
    self._index = {client_id: i for i, client_id in enumerate(self._ids)}
    if len(self._ids) != int(meta.get('num_clients', -1)) or len(self._index) != len(self._ids):
      raise invalid(
        f'{len(self._ids)} client rows ({len(self._index)} distinct ids) but meta says '
        f'num_clients={meta.get("num_clients")}'
      )
    if not all(type(c) is int or type(c) is str for c in self._ids):
      raise invalid('client ids must be integer or text')
    self._columns = ', '.join(f'f{i}' for i in range(len(self._features)))

  @classmethod
  def build(
    cls, source: FederatedData, path: str | os.PathLike, *, overwrite: bool = False
  ) -> SQLiteFederatedData:
    """Writes every client of `source` to an SQLite file at `path` and opens it.

    Clients are read one at a time (through `source.get_client`, so its preprocessing hooks
    apply), so memory stays bounded by one client plus a batch of rows. The file is built at
    `path + '.tmp'` and moved to `path` only when complete: an interrupted build leaves no file
    at `path`, and no `.tmp` behind unless the process itself is killed.

    Args:
      source: the population; ids must be str or int, and every client must have the same
        features with the same dtype and per-example shape.
      path: where to write the file.
      overwrite: replace an existing file at `path`.

    Returns:
      The written population, opened read-only.

    Raises:
      FileExistsError: `path` exists and `overwrite` is False.
      TypeError: `source` is not a `FederatedData`, a client id is not str/int, or a feature has
        an object or structured dtype.
      ValueError: a client's features, dtypes or per-example shapes differ from the first
        client's, or `source` has no clients.
    """
    if not isinstance(source, FederatedData):
      raise TypeError(f'source must be a FederatedData; got {type(source).__name__}')
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
      raise FileExistsError(f'{path} exists; pass overwrite=True to replace it')
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
      raise FileNotFoundError(f'cannot build {path}: its directory does not exist')
    tmp = path + '.tmp'
    try:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)  # left by a killed build
      _write(source, tmp)
      os.replace(tmp, path)
    except BaseException:
      with contextlib.suppress(FileNotFoundError):
        os.remove(tmp)
      raise
    return cls(path)

  @property
  def client_ids(self) -> list:
    return self._ids

  @property
  def client_sizes(self) -> np.ndarray:
    return self._sizes

  def _read(self, client_id: Any) -> ClientDataset:
    return self._read_many([client_id])[0]

  def _read_many(self, client_ids: list) -> list[ClientDataset]:
    """The raw arrays of known clients, in one query per `_MAX_PARAMS` clients: about twice as
    fast as one query per client for cohorts of 100+."""
    idxs = [self._index[c] for c in client_ids]
    blobs = {}
    for start in range(0, len(idxs), _MAX_PARAMS):
      chunk = idxs[start : start + _MAX_PARAMS]
      sql = f'SELECT idx, {self._columns} FROM data WHERE idx IN ({", ".join("?" * len(chunk))})'
      blobs.update((row[0], row[1:]) for row in self._conn.fetchall(self._path, sql, chunk))
    datasets = []
    for client_id, idx in zip(client_ids, idxs, strict=True):
      if idx not in blobs:
        raise ValueError(f'{self._path} is corrupt: client {client_id!r} has no data row')
      dataset = self._decode(client_id, idx, blobs[idx])
      if self._crcs is not None and _crc(blobs[idx]) != self._crcs[idx]:
        raise ValueError(
          f'{self._path} is corrupt: the data of client {client_id!r} does not match its '
          'checksum (the file was altered or truncated); rebuild it with '
          'SQLiteFederatedData.build'
        )
      datasets.append(dataset)
    return datasets

  def verify(self) -> None:
    """Checks the whole file: SQLite's own integrity check, then every client's checksum.

    Reads every client once (no preprocessing), so it takes as long as one pass over the data.

    Raises:
      ValueError: naming the damage (SQLite's report, or the first client that fails).
    """
    report = self._conn.fetchall(self._path, 'PRAGMA integrity_check')
    if report != [('ok',)]:
      raise ValueError(f'{self._path} is corrupt: {"; ".join(r[0] for r in report[:5])}')
    for start in range(0, len(self._ids), _MAX_PARAMS):
      self._read_many(self._ids[start : start + _MAX_PARAMS])

  def _decode(self, client_id: Any, idx: int, blobs: tuple) -> ClientDataset:
    n = int(self._sizes[idx])
    dataset = {}
    for (name, dtype, shape), blob in zip(self._features, blobs, strict=True):
      nbytes = n * math.prod(shape) * dtype.itemsize
      if not isinstance(blob, bytes) or len(blob) != nbytes:
        got = f'{len(blob)} bytes' if isinstance(blob, bytes) else repr(blob)
        raise ValueError(
          f"{self._path} is corrupt: client {client_id!r} feature '{name}' holds {got}; expected "
          f'{nbytes} bytes for {n} examples of {_describe(dtype, shape)}'
        )
      dataset[name] = np.frombuffer(blob, dtype).reshape(n, *shape).copy()
    return dataset

  def close(self) -> None:
    """Closes the file (for this population and every view of it)."""
    self._conn.close()

  def __enter__(self) -> SQLiteFederatedData:
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def __repr__(self) -> str:
    return f'SQLiteFederatedData({self._path!r}, num_clients={self.num_clients})'


def _write(source: FederatedData, path: str) -> None:
  """Writes `source` to a new SQLite file at `path` in one transaction."""
  # No journal and no syncs while writing: the file is private until `build` renames it, and
  # it is flushed to disk (below) before that.
  conn = sqlite3.connect(path, isolation_level=None)
  try:
    conn.execute('PRAGMA journal_mode = OFF')
    conn.execute('PRAGMA synchronous = OFF')
    conn.execute('BEGIN')
    conn.execute('CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)')
    conn.execute(
      'CREATE TABLE features (position INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, '
      'dtype TEXT NOT NULL, shape TEXT NOT NULL)'
    )
    conn.execute(
      'CREATE TABLE clients (idx INTEGER PRIMARY KEY, id NOT NULL, num_examples INTEGER, '
      'crc INTEGER NOT NULL)'
    )
    first_id, schema, insert = None, None, None
    index, batch, batch_bytes, seen = [], [], 0, set()
    for idx, client_id in enumerate(source.client_ids):
      key = _id_key(client_id)
      if key in seen:
        raise ValueError(f'source has client id {client_id!r} twice')
      seen.add(key)
      dataset = check_client_dataset(client_id, source.get_client(client_id))
      if schema is None:
        first_id, schema = client_id, _schema(client_id, dataset)
        insert = _create_data_table(conn, schema)
      else:
        _check_schema(schema, first_id, client_id, dataset)
      blobs = [np.ascontiguousarray(dataset[name]).tobytes() for name in schema]
      index.append((idx, key, len(next(iter(dataset.values()))), _crc(blobs)))
      batch.append((idx, *blobs))
      batch_bytes += sum(map(len, blobs))
      if len(batch) >= _BATCH_ROWS or batch_bytes >= _BATCH_BYTES:
        conn.executemany(insert, batch)
        batch, batch_bytes = [], 0
    if schema is None:
      raise ValueError('source has no clients; a population needs at least one')
    conn.executemany(insert, batch)
    conn.executemany('INSERT INTO clients VALUES (?, ?, ?, ?)', index)
    meta = {
      'format': _FORMAT,
      'version': str(_VERSION),
      'num_clients': str(len(index)),
      'index_crc': str(_index_crc([row[1:] for row in index])),
    }
    conn.executemany('INSERT INTO meta VALUES (?, ?)', meta.items())
    conn.execute('COMMIT')
  finally:
    conn.close()
  with open(path, 'rb+') as f:
    os.fsync(f.fileno())


def _crc(blobs: Sequence[bytes]) -> int:
  """CRC-32 of a client's feature blobs, in column order."""
  crc = 0
  for blob in blobs:
    crc = zlib.crc32(blob if isinstance(blob, bytes) else b'', crc)
  return crc


def _index_crc(rows: Sequence[tuple]) -> int:
  """CRC-32 of the `clients` rows `(id, num_examples, crc)`, ids typed (1 and '1' differ)."""
  return zlib.crc32(json.dumps([[type(i).__name__, i, n, c] for i, n, c in rows]).encode())


def _schema(client_id: Any, dataset: ClientDataset) -> dict[str, tuple[np.dtype, tuple]]:
  schema = {}
  for name, array in dataset.items():
    if array.dtype.kind not in _STORABLE_KINDS:
      raise TypeError(
        f"client {client_id!r} feature '{name}' has dtype {array.dtype}; SQLiteFederatedData "
        'stores bool, numeric, bytes/str and datetime arrays'
      )
    schema[name] = (array.dtype, array.shape[1:])
  return schema


def _check_schema(schema: dict, first_id: Any, client_id: Any, dataset: ClientDataset) -> None:
  if dataset.keys() != schema.keys():
    raise ValueError(
      f'client {client_id!r} has features {sorted(dataset)}; expected {sorted(schema)} like '
      f'client {first_id!r}'
    )
  for name, (dtype, shape) in schema.items():
    array = dataset[name]
    if array.dtype != dtype or array.shape[1:] != shape:
      raise ValueError(
        f"client {client_id!r} feature '{name}' is {_describe(array.dtype, array.shape[1:])} per "
        f'example; expected {_describe(dtype, shape)} like client {first_id!r}'
      )


def _create_data_table(conn: sqlite3.Connection, schema: dict) -> str:
  """Creates `features` rows and the `data` table; returns the insert statement for `data`."""
  conn.executemany(
    'INSERT INTO features VALUES (?, ?, ?, ?)',
    [
      (i, name, dtype.str, json.dumps(list(shape)))
      for i, (name, (dtype, shape)) in enumerate(schema.items())
    ],
  )
  columns = ', '.join(f'f{i} BLOB NOT NULL' for i in range(len(schema)))
  conn.execute(f'CREATE TABLE data (idx INTEGER PRIMARY KEY, {columns})')
  return f'INSERT INTO data VALUES ({", ".join("?" * (len(schema) + 1))})'
