"""SQLiteFederatedData: exact round trips, bad files, atomic builds, threads, 100k clients."""

from __future__ import annotations

import os
import sqlite3
import tempfile
import threading
import time

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

import fedjax_lite as fl


class _Source(fl.data.FederatedData):
  """A population that does not validate its clients (unlike InMemoryFederatedData), reading
  clients from a callable; `fail_after` makes the read of that many clients raise."""

  def __init__(self, ids, read, sizes=None, fail_after=None):
    super().__init__()
    self._ids, self._fn, self._fail_after, self.reads = list(ids), read, fail_after, 0
    self._sizes = np.zeros(len(self._ids), np.int64) if sizes is None else sizes

  @property
  def client_ids(self):
    return self._ids

  @property
  def client_sizes(self):
    return self._sizes

  def _read(self, client_id):
    if self.reads == self._fail_after:
      raise RuntimeError('disk on fire')
    self.reads += 1
    return self._fn(client_id)


def _population(ids=('alice', 'bob', 'carol', 'dan')):
  rng = np.random.default_rng(0)
  clients = {}
  for client_id, n in zip(ids, [3, 0, 5, 1], strict=True):
    clients[client_id] = {
      'x': rng.standard_normal((n, 2, 3)).astype(np.float32),
      'label': rng.integers(-5, 5, n).astype(np.int32),
      'token': rng.integers(-(2**40), 2**40, (n, 4)),
      'pixels': rng.integers(0, 256, (n, 4, 4), dtype=np.uint8),
      'mask': rng.random(n) < 0.5,
    }
  return fl.data.InMemoryFederatedData(clients)


def _assert_same_population(got, want):
  assert got.client_ids == want.client_ids
  assert [type(c) for c in got.client_ids] == [type(c) for c in want.client_ids]
  assert got.client_sizes.dtype == np.int64
  np.testing.assert_array_equal(got.client_sizes, want.client_sizes)
  for client_id in want.client_ids:
    a, b = got.get_client(client_id), want.get_client(client_id)
    assert list(a) == list(b)
    for name in b:
      assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape, name
      np.testing.assert_array_equal(a[name], b[name])
      assert a[name].flags.writeable and a[name].flags.owndata


@pytest.mark.parametrize(
  'ids', [('alice', 'bob', 'carol', 'dan'), (7, -3, 0, 2**62), ('1', 1, '', -(2**63))]
)
def test_round_trip_is_exact(tmp_path, ids):
  source = _population(ids)
  path = tmp_path / 'pop.sqlite'
  built = fl.data.SQLiteFederatedData.build(source, path)
  _assert_same_population(built, source)
  built.close()
  with fl.data.SQLiteFederatedData(str(path)) as data:
    _assert_same_population(data, source)
    assert data.get_client(ids[1])['x'].shape == (0, 2, 3)  # the empty client
    got = data.get_clients([ids[2], ids[0], ids[2]])
    assert [len(d['label']) for d in got] == [5, 3, 5]
    np.testing.assert_array_equal(got[1]['token'], source.get_client(ids[0])['token'])
    assert got[0]['x'] is not got[2]['x']


_DTYPES = [np.float32, np.float64, np.int32, np.int64, np.uint8, np.bool_, np.float16, '<U3']


@st.composite
def _populations(draw):
  ids = draw(
    st.lists(
      st.one_of(
        st.integers(-(2**63), 2**63 - 1),
        st.text(st.characters(blacklist_categories=('Cs',)), max_size=4),
      ),
      min_size=1,
      max_size=5,
      unique_by=lambda c: (type(c), c),
    )
  )
  features = draw(
    st.dictionaries(
      st.text('abcxyz_', min_size=1, max_size=3),
      st.tuples(st.sampled_from(_DTYPES), st.lists(st.integers(0, 3), max_size=2)),
      min_size=1,
      max_size=3,
    )
  )
  sizes = draw(st.lists(st.integers(0, 4), min_size=len(ids), max_size=len(ids)))
  rng = np.random.default_rng(draw(st.integers(0, 2**32)))
  clients = {}
  for client_id, n in zip(ids, sizes, strict=True):
    clients[client_id] = {
      name: (rng.standard_normal((n, *shape)) * 100).astype(dtype)
      for name, (dtype, shape) in features.items()
    }
  return fl.data.InMemoryFederatedData(clients)


@hypothesis.settings(max_examples=25, deadline=None)
@hypothesis.given(_populations())
def test_any_population_round_trips(source):
  with (
    tempfile.TemporaryDirectory() as tmp,
    fl.data.SQLiteFederatedData.build(source, os.path.join(tmp, 'p.sqlite')) as data,
  ):
    _assert_same_population(data, source)


def test_preprocess_client_view(tmp_path):
  source = _population()
  data = fl.data.SQLiteFederatedData.build(source, tmp_path / 'pop.sqlite')
  doubled = data.preprocess_client(lambda d: {**d, 'x': d['x'] * 2})
  assert isinstance(doubled, fl.data.SQLiteFederatedData)
  raw = source.get_client('carol')['x']
  np.testing.assert_array_equal(doubled.get_client('carol')['x'], raw * 2)
  np.testing.assert_array_equal(doubled.get_clients(['dan', 'carol'])[1]['x'], raw * 2)
  np.testing.assert_array_equal(data.get_client('carol')['x'], raw)
  assert [c for c, _ in doubled] == data.client_ids
  bad = data.preprocess_client(lambda d: {'x': d['x'], 'label': d['label'][:1]})
  with pytest.raises(ValueError, match='share a leading example axis'):
    bad.get_clients(['carol'])
  data.close()  # views share the connection
  with pytest.raises(ValueError, match='is closed'):
    doubled.get_client('carol')


def test_unknown_client_id(tmp_path):
  data = fl.data.SQLiteFederatedData.build(_population((1, 2, 3, 4)), tmp_path / 'pop.sqlite')
  with pytest.raises(KeyError, match="unknown client id '1'"):
    data.get_client('1')  # ids keep their type: '1' is not 1
  with pytest.raises(KeyError, match='unknown client id 5'):
    data.get_clients([1, 5])


def test_missing_and_foreign_files(tmp_path):
  with pytest.raises(FileNotFoundError, match=r'no SQLite population at .*nope\.sqlite'):
    fl.data.SQLiteFederatedData(tmp_path / 'nope.sqlite')
  garbage = tmp_path / 'garbage.sqlite'
  garbage.write_bytes(np.random.default_rng(0).bytes(10_000))
  with pytest.raises(ValueError, match=r'garbage\.sqlite is not a fedjax_lite SQLite population'):
    fl.data.SQLiteFederatedData(garbage)
  other = tmp_path / 'other.sqlite'
  with sqlite3.connect(other) as conn:
    conn.execute('CREATE TABLE t (a)')
  with pytest.raises(ValueError, match='not a fedjax_lite SQLite population: no such table: meta'):
    fl.data.SQLiteFederatedData(other)
  (tmp_path / 'empty.sqlite').touch()
  with pytest.raises(ValueError, match='not a fedjax_lite SQLite population'):
    fl.data.SQLiteFederatedData(tmp_path / 'empty.sqlite')


def test_other_format_version_is_rejected(tmp_path):
  path = tmp_path / 'pop.sqlite'
  fl.data.SQLiteFederatedData.build(_population(), path).close()
  with sqlite3.connect(path) as conn:
    conn.execute("UPDATE meta SET value = '3' WHERE key = 'version'")
  with pytest.raises(ValueError, match=r"version='3'; expected .* version in \('1', '2'\)"):
    fl.data.SQLiteFederatedData(path)


def test_version_1_files_without_checksums_still_read(tmp_path):
  path = tmp_path / 'pop.sqlite'
  fl.data.SQLiteFederatedData.build(_population(), path).close()
  with sqlite3.connect(path) as conn:
    conn.execute('ALTER TABLE clients DROP COLUMN crc')
    conn.execute("UPDATE meta SET value = '1' WHERE key = 'version'")
    conn.execute("DELETE FROM meta WHERE key = 'index_crc'")
  with fl.data.SQLiteFederatedData(path) as data:
    _assert_same_population(data, _population())


def _big_file(tmp_path):
  rng = np.random.default_rng(1)
  clients = {f'c{i}': {'x': rng.standard_normal((50, 20)).astype(np.float32)} for i in range(40)}
  path = tmp_path / 'big.sqlite'
  fl.data.SQLiteFederatedData.build(fl.data.InMemoryFederatedData(clients), path).close()
  return path


def test_truncated_file(tmp_path):
  path = _big_file(tmp_path)
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(
    ValueError, match=r'big\.sqlite is not a fedjax_lite SQLite population: database disk image'
  ):
    fl.data.SQLiteFederatedData(path)


def test_corrupt_pages_and_blobs(tmp_path):
  path = _big_file(tmp_path)
  data = fl.data.SQLiteFederatedData(path)
  with open(path, 'r+b') as f:  # a page of arrays: opening still works, reading does not
    f.seek(4096 * 20)
    f.write(b'\xff' * 4096)
  with pytest.raises(ValueError, match=r'big\.sqlite is corrupt: database disk image is malformed'):
    data.get_clients(data.client_ids)
  (tmp_path / 'again').mkdir()
  path = _big_file(tmp_path / 'again')
  with sqlite3.connect(path) as conn:
    conn.execute("UPDATE data SET f0 = x'0000' WHERE idx = 3")
  data = fl.data.SQLiteFederatedData(path)
  np.testing.assert_array_equal(data.get_client('c2')['x'].shape, (50, 20))
  match = "client 'c3' feature 'x' holds 2 bytes; expected 4000 bytes for 50 examples of float32"
  with pytest.raises(ValueError, match=match):
    data.get_client('c3')


def _flip(path, needle: bytes, offset: int = 7) -> None:
  """Flips one byte inside the first occurrence of `needle` in the file."""
  content = bytearray(path.read_bytes())
  at = content.find(needle)
  assert at >= 0
  content[at + offset] ^= 0x5A
  path.write_bytes(bytes(content))


def test_a_flipped_byte_in_a_client_is_an_error_naming_it(tmp_path):
  # Before checksums, a few flipped bytes read back as silently altered data.
  path = _big_file(tmp_path)
  with fl.data.SQLiteFederatedData(path) as data:
    victim = data.get_client('c7')['x']
  _flip(path, victim.tobytes()[:64])
  with fl.data.SQLiteFederatedData(path) as data:
    np.testing.assert_array_equal(data.get_client('c6')['x'].shape, (50, 20))  # others read
    with pytest.raises(ValueError, match=r"big\.sqlite is corrupt: the data of client 'c7' does"):
      data.get_client('c7')
    with pytest.raises(ValueError, match="client 'c7'"):
      data.verify()


def test_truncated_by_less_than_a_page_is_caught(tmp_path):
  path = _big_file(tmp_path)
  fl.data.SQLiteFederatedData(path).verify()  # intact
  os.truncate(path, os.path.getsize(path) - 100)
  with pytest.raises(ValueError, match=r'big\.sqlite is (corrupt|not a fedjax_lite SQLite)'):
    fl.data.SQLiteFederatedData(path).verify()


def test_an_altered_client_index_is_caught_on_open(tmp_path):
  path = _big_file(tmp_path)
  with sqlite3.connect(path) as conn:
    conn.execute('UPDATE clients SET num_examples = 49 WHERE idx = 5')
  with pytest.raises(ValueError, match=r'client index .* does not match the checksum'):
    fl.data.SQLiteFederatedData(path)


def _ragged(spec):
  """A source whose client i has feature arrays `spec[i]`: {name: (dtype, shape)}."""
  return _Source(range(len(spec)), lambda i: {k: np.zeros(s, d) for k, (d, s) in spec[i].items()})


@pytest.mark.parametrize(
  ('source', 'error', 'match'),
  [
    (_ragged([{'x': ('f4', (2, 3))}, {'y': ('f4', (2, 3))}]), ValueError, 'client 1 has features'),
    (
      _ragged([{'x': ('f4', (2, 3))}, {'x': ('f4', (2, 4))}]),
      ValueError,
      r"client 1 feature 'x' is float32\[4\] per example; expected float32\[3\] like client 0",
    ),
    (
      _ragged([{'x': ('f4', (2, 3))}, {'x': ('i4', (2, 3))}, {'x': ('f4', (1, 3))}]),
      ValueError,
      r"client 1 feature 'x' is int32\[3\] per example; expected float32\[3\]",
    ),
    (_ragged([{'x': ('f4', (2,)), 'y': ('f4', (3,))}]), ValueError, 'share a leading'),
    (_ragged([{'x': ('O', (2,))}]), TypeError, "feature 'x' has dtype object"),
    (
      _Source([1.5], lambda c: {'x': np.zeros(1)}),
      TypeError,
      'must be str or int to be stored in SQLite; got float 1.5',
    ),
    (_Source([True], lambda c: {'x': np.zeros(1)}), TypeError, 'got bool True'),
    (_Source(['\ud800'], lambda c: {'x': np.zeros(1)}), ValueError, 'valid UTF-8'),
    (_Source([2**63], lambda c: {'x': np.zeros(1)}), ValueError, 'fit in int64'),
    (_Source([3, 3], lambda c: {'x': np.zeros(1)}), ValueError, 'client id 3 twice'),
    (_Source([], lambda c: {}), ValueError, 'source has no clients'),
    ({'a': {'x': np.zeros(1)}}, TypeError, 'source must be a FederatedData; got dict'),
  ],
)
def test_inconsistent_sources_are_rejected(tmp_path, source, error, match):
  path = tmp_path / 'pop.sqlite'
  with pytest.raises(error, match=match):
    fl.data.SQLiteFederatedData.build(source, path)
  assert os.listdir(tmp_path) == []


def test_build_is_atomic(tmp_path):
  path = tmp_path / 'pop.sqlite'
  rows = lambda c: {'x': np.full((2, 3), c, np.float32)}
  failing = _Source(range(3000), rows, fail_after=2500)
  with pytest.raises(RuntimeError, match='disk on fire'):
    fl.data.SQLiteFederatedData.build(failing, path)
  assert failing.reads == 2500 and os.listdir(tmp_path) == []  # no file, no .tmp left
  fl.data.SQLiteFederatedData.build(_population(), path).close()
  with pytest.raises(FileNotFoundError, match='its directory does not exist'):
    fl.data.SQLiteFederatedData.build(_population(), tmp_path / 'no' / 'pop.sqlite')
  with pytest.raises(FileExistsError, match=r'pop\.sqlite exists; pass overwrite=True'):
    fl.data.SQLiteFederatedData.build(_Source(range(3), rows), path)
  with pytest.raises(RuntimeError, match='disk on fire'):
    fl.data.SQLiteFederatedData.build(
      _Source(range(3000), rows, fail_after=2900), path, overwrite=True
    )
  assert sorted(os.listdir(tmp_path)) == ['pop.sqlite']
  with fl.data.SQLiteFederatedData(path) as data:  # the old population, untouched
    _assert_same_population(data, _population())
  (tmp_path / 'pop.sqlite.tmp').write_bytes(b'left by a killed build')
  with fl.data.SQLiteFederatedData.build(_Source(range(3), rows), path, overwrite=True) as data:
    assert data.client_ids == [0, 1, 2] and data.get_client(2)['x'][0, 0] == 2
  assert sorted(os.listdir(tmp_path)) == ['pop.sqlite']


def test_reads_from_other_threads(tmp_path):
  rows = lambda c: {'x': np.full((c % 7, 3), c, np.int64)}
  data = fl.data.SQLiteFederatedData.build(_Source(range(2000), rows), tmp_path / 'pop.sqlite')
  errors, start = [], threading.Barrier(4)

  def read_all(ids):
    start.wait()
    try:
      for i in ids:
        (x,) = data.get_clients([i]) if i % 2 else (data.get_client(i),)
        np.testing.assert_array_equal(x['x'], rows(i)['x'])
    except Exception as e:  # reported by the main thread
      errors.append(e)

  threads = [threading.Thread(target=read_all, args=(range(k, 2000, 3),)) for k in range(3)]
  for t in threads:
    t.start()
  read_all(range(1999, -1, -1))  # the main thread reads too, at the same time
  for t in threads:
    t.join()
  assert not errors, errors[0]


class _ArraySource(fl.data.FederatedData):
  """`n` clients of 1-5 examples of a 4-float feature, sliced from one array."""

  def __init__(self, n):
    super().__init__()
    rng = np.random.default_rng(0)
    self._sizes = rng.integers(1, 6, n)
    self._offsets = np.concatenate([[0], np.cumsum(self._sizes)])
    self.x = rng.standard_normal((self._offsets[-1], 4)).astype(np.float32)

  @property
  def client_ids(self):
    return range(len(self._sizes))

  @property
  def client_sizes(self):
    return self._sizes

  def _read(self, client_id):
    return {'x': self.x[self._offsets[client_id] : self._offsets[client_id + 1]]}


def _bytes_read() -> int:
  """Bytes this process has read from files so far (Linux `rchar`)."""
  with open('/proc/self/io') as f:
    return int(next(line for line in f if line.startswith('rchar')).split()[1])


@pytest.mark.skipif(not os.path.exists('/proc/self/io'), reason='needs Linux /proc/self/io')
def test_100k_clients_build_and_sample_without_reading_the_arrays(tmp_path):
  source = _ArraySource(100_000)
  path = tmp_path / 'pop.sqlite'
  start = time.perf_counter()
  fl.data.SQLiteFederatedData.build(source, path).close()
  assert time.perf_counter() - start < 8  # ~1.5 s on one core
  blob_bytes = source.x.nbytes
  before = _bytes_read()
  data = fl.data.SQLiteFederatedData(path)
  assert _bytes_read() - before < blob_bytes / 2  # the id/size table, not the arrays
  assert data.client_ids == list(range(100_000))
  np.testing.assert_array_equal(data.client_sizes, source.client_sizes)
  cohort = fl.data.sample_cohort(data.num_clients, 100, round_num=3, client_sizes=data.client_sizes)
  ids = [data.client_ids[i] for i in cohort]
  for client_id, dataset in zip(ids, data.get_clients(ids), strict=True):
    np.testing.assert_array_equal(dataset['x'], source.get_client(client_id)['x'])
  data.close()
