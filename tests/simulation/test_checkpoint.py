"""FileCheckpointManager: bitwise round trips, retention, damaged files, mismatches, atomicity."""

import os
import pathlib
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.simulation import _files


class _Inner(NamedTuple):
  count: jax.Array
  flags: jax.Array


def _state(offset=0.0):
  return {
    'weights': {
      'w': jnp.arange(6, dtype=jnp.float32).reshape(2, 3) / 7 + offset,
      'nan': jnp.array([jnp.nan, -0.0, jnp.inf], jnp.float32),
    },
    'inner': _Inner(jnp.array(2**31 - 1, jnp.int32), jnp.array([True, False])),
    'rng': jax.random.PRNGKey(123),  # uint32[2]
    'lr': jnp.float32(0.1),  # 0-d
    'half': jnp.array([1.5, -2.25], jnp.bfloat16),
    'empty': jnp.zeros((0, 4), jnp.int8),
  }


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(x.reshape(-1).view(np.uint8), y.reshape(-1).view(np.uint8))


def test_round_trip_is_bitwise_for_every_dtype(tmp_path):
  manager = fl.simulation.FileCheckpointManager(tmp_path, metadata={'seed': 3, 'config': {'a': 1}})
  state = _state()
  path = manager.save_checkpoint(state, 5)
  assert path == os.path.join(tmp_path, 'ckpt_5.msgpack')
  restored, round_num = manager.load_latest_checkpoint(jax.eval_shape(lambda: state))
  assert round_num == 5
  _assert_bitwise_equal(restored, state)
  assert isinstance(restored['inner'], _Inner)
  _assert_bitwise_equal(manager.load_checkpoint(state, 5), state)  # a state works as structure
  assert manager.load_metadata() == {'seed': 3, 'config': {'a': 1}}
  manager.save_checkpoint(state, 6, metadata={'seed': 4})
  assert manager.load_metadata(6) == {'seed': 4}
  assert manager.load_metadata(5) == {'seed': 3, 'config': {'a': 1}}


def test_nothing_to_resume(tmp_path):
  structure = jax.eval_shape(_state)
  assert fl.simulation.FileCheckpointManager(tmp_path / 'missing').load_latest_checkpoint(
    structure
  ) == (None, 0)
  assert fl.simulation.FileCheckpointManager(tmp_path).load_latest_checkpoint(structure) == (
    None,
    0,
  )
  with pytest.raises(FileNotFoundError, match='round_num=2'):
    fl.simulation.FileCheckpointManager(tmp_path).load_checkpoint(structure, 2)


def test_latest_round_wins_and_keep_retains_the_newest(tmp_path):
  manager = fl.simulation.FileCheckpointManager(tmp_path, keep=2)
  for round_num in [0, 1, 2, 10, 3]:  # numeric order, not name order (10 > 3)
    manager.save_checkpoint(_state(offset=round_num), round_num)
  assert manager.checkpoint_rounds() == [3, 10]
  assert sorted(os.listdir(tmp_path)) == ['ckpt_10.msgpack', 'ckpt_3.msgpack']
  state, round_num = manager.load_latest_checkpoint(jax.eval_shape(_state))
  assert round_num == 10
  _assert_bitwise_equal(state, _state(offset=10))
  keep_all = fl.simulation.FileCheckpointManager(tmp_path / 'all', keep=None, prefix='state-')
  for round_num in range(5):
    keep_all.save_checkpoint(_state(), round_num)
  assert keep_all.checkpoint_rounds() == [0, 1, 2, 3, 4]
  assert os.listdir(tmp_path / 'all')[0].startswith('state-')


@pytest.mark.parametrize('damage', ['truncate', 'garbage', 'empty', 'flip_byte'])
def test_damaged_latest_falls_back_with_a_warning(tmp_path, damage):
  manager = fl.simulation.FileCheckpointManager(tmp_path, keep=3)
  for round_num in range(3):
    manager.save_checkpoint(_state(offset=round_num), round_num)
  latest = manager.checkpoint_path(2)
  data = pathlib.Path(latest).read_bytes()
  damaged = {
    'truncate': data[: len(data) // 2],
    'garbage': np.random.default_rng(0).bytes(len(data)),
    'empty': b'',
    'flip_byte': data[:-5] + bytes([data[-5] ^ 1]) + data[-4:],
  }[damage]
  with open(latest, 'wb') as f:
    f.write(damaged)
  with pytest.warns(RuntimeWarning, match=r'ckpt_2\.msgpack is unreadable'):
    state, round_num = manager.load_latest_checkpoint(jax.eval_shape(_state))
  assert round_num == 1
  _assert_bitwise_equal(state, _state(offset=1))
  with pytest.raises(ValueError, match=r'checksum|bytes|magic'):
    manager.load_checkpoint(jax.eval_shape(_state), 2)


def test_all_damaged_raises_instead_of_starting_over(tmp_path):
  manager = fl.simulation.FileCheckpointManager(tmp_path)
  for round_num in range(2):
    path = manager.save_checkpoint(_state(), round_num)
    with open(path, 'r+b') as f:
      f.truncate(30)
  with (
    pytest.warns(RuntimeWarning, match='unreadable'),
    pytest.raises(ValueError, match=r'none of the checkpoints .* \(rounds \[0, 1\]\) is readable'),
  ):
    manager.load_latest_checkpoint(jax.eval_shape(_state))


@pytest.mark.parametrize(
  ('change', 'message'),
  [
    (
      lambda s: {**s, 'lr': jnp.int32(1)},
      r"leaf \['lr'\] is float32\[\]; expected int32\[\]",
    ),
    (
      lambda s: {**s, 'weights': {**s['weights'], 'w': jnp.zeros((3, 2))}},
      r"leaf \['weights'\]\['w'\] is float32\[2, 3\]; expected float32\[3, 2\]",
    ),
    (
      lambda s: {**s, 'extra': jnp.zeros(())},
      r"leaf \['extra'\] is missing from the checkpoint",
    ),
    (
      lambda s: {k: v for k, v in s.items() if k != 'rng'},
      r"the checkpoint has leaf \['rng'\], which the structure lacks",
    ),
  ],
)
def test_structure_mismatch_names_the_leaf(tmp_path, change, message):
  manager = fl.simulation.FileCheckpointManager(tmp_path)
  manager.save_checkpoint(_state(), 0)
  manager.save_checkpoint(_state(), 1)
  structure = jax.eval_shape(lambda: change(_state()))
  with pytest.raises(ValueError, match=message):  # no fallback to round 0: a different process
    manager.load_latest_checkpoint(structure)


def test_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
  manager = fl.simulation.FileCheckpointManager(tmp_path, keep=1)
  path = manager.save_checkpoint(_state(), 4)
  before = pathlib.Path(path).read_bytes()

  def failing_replace(src, dst):
    raise OSError('disk full')

  monkeypatch.setattr(_files.os, 'replace', failing_replace)
  with pytest.raises(OSError, match='disk full'):
    manager.save_checkpoint(_state(offset=1), 5)
  with pytest.raises(OSError, match='disk full'):
    manager.save_checkpoint(_state(offset=1), 4)  # overwriting the same round
  monkeypatch.undo()
  assert os.listdir(tmp_path) == ['ckpt_4.msgpack']  # no temporary file left, none deleted
  assert pathlib.Path(path).read_bytes() == before
  # A temporary file left by a process killed mid-write is never taken for a checkpoint.
  (tmp_path / '.ckpt_9.msgpack.0123abcd.tmp').write_bytes(b'partial')
  assert manager.checkpoint_rounds() == [4]
  state, round_num = manager.load_latest_checkpoint(jax.eval_shape(_state))
  assert round_num == 4
  _assert_bitwise_equal(state, _state())


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError, match='keep must be an int >= 1 or None; got 0'):
    fl.simulation.FileCheckpointManager(tmp_path, keep=0)
  with pytest.raises(ValueError, match='prefix'):
    fl.simulation.FileCheckpointManager(tmp_path, prefix='')
  with pytest.raises(TypeError, match='metadata must be JSON-serializable'):
    fl.simulation.FileCheckpointManager(tmp_path, metadata={'x': object()})
  manager = fl.simulation.FileCheckpointManager(tmp_path)
  with pytest.raises(ValueError, match='round_num must be an int >= 0; got -1'):
    manager.save_checkpoint(_state(), -1)
  with pytest.raises(TypeError, match=r"leaf \['key'\] is a typed PRNG key"):
    manager.save_checkpoint({'key': jax.random.key(0)}, 0)
