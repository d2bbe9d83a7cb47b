"""The simple cohort batcher: every real example exactly once per epoch, exact masks."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl


def _clients(sizes):
  # Example i of client c has the unique id 1000 * c + i.
  return [
    {'x': (1000 * c + np.arange(n, dtype=np.float32))[:, None], 'y': np.zeros(n, np.int32)}
    for c, n in enumerate(sizes)
  ]


@settings(max_examples=30, deadline=None)
@given(
  sizes=st.lists(st.integers(0, 23), min_size=1, max_size=5),
  batch_size=st.integers(1, 6),
  num_epochs=st.integers(1, 3),
  max_steps=st.one_of(st.none(), st.integers(1, 6)),
)
def test_every_example_once_per_epoch(sizes, batch_size, num_epochs, max_steps):
  batches = fl.data.build_client_batches(
    _clients(sizes), batch_size=batch_size, num_epochs=num_epochs, max_steps=max_steps, seed=3
  )
  mask = batches.mask
  x = batches.batch['x'][..., 0]
  assert mask.shape[0] == len(sizes) and mask.shape[2] == batch_size
  for c, n in enumerate(sizes):
    steps = -(-n * num_epochs // batch_size)
    kept = n * num_epochs if max_steps is None else min(n * num_epochs, max_steps * batch_size)
    flat_mask = mask[c].reshape(-1)
    # Real examples fill a prefix of the client's rows: only the last batch is partial.
    np.testing.assert_array_equal(flat_mask[:kept], 1.0)
    np.testing.assert_array_equal(flat_mask[kept:], 0.0)
    assert mask.shape[1] >= (steps if max_steps is None else min(steps, max_steps))
    ids = x[c].reshape(-1)[:kept]
    np.testing.assert_array_equal(x[c].reshape(-1)[kept:], 0.0)  # padding is zeros
    if max_steps is None:
      counts = np.bincount((ids - 1000 * c).astype(int), minlength=n)
      np.testing.assert_array_equal(counts, num_epochs)
    for e in range(kept // max(n, 1)):  # each complete epoch is a permutation
      np.testing.assert_array_equal(np.sort(ids[e * n : (e + 1) * n]), 1000 * c + np.arange(n))


def test_seeded_shuffles():
  clients = _clients([30, 30])
  a = fl.data.build_client_batches(clients, batch_size=4, seed=(1, 2))
  b = fl.data.build_client_batches(clients, batch_size=4, seed=(1, 2))
  c = fl.data.build_client_batches(clients, batch_size=4, seed=(1, 3))
  np.testing.assert_array_equal(a.batch['x'], b.batch['x'])
  assert not np.array_equal(a.batch['x'], c.batch['x'])
  d = fl.data.build_client_batches(clients, batch_size=4, shuffle=False)
  np.testing.assert_array_equal(d.batch['x'][0].reshape(-1)[:30], np.arange(30))


def test_num_steps_pads_and_checks():
  batches = fl.data.build_client_batches(_clients([5]), batch_size=2, num_steps=7)
  assert batches.mask.shape == (1, 7, 2) and batches.mask.sum() == 5
  with pytest.raises(ValueError, match='num_steps=2 is below the longest client'):
    fl.data.build_client_batches(_clients([5]), batch_size=2, num_steps=2)


@pytest.mark.parametrize(
  ('clients', 'kwargs', 'match'),
  [
    ([], {}, 'clients is empty'),
    (_clients([3]), {'batch_size': 0}, 'batch_size must be an int >= 1'),
    (_clients([3]), {'num_epochs': 0}, 'num_epochs must be an int >= 1'),
    (_clients([3]), {'max_steps': 0}, 'max_steps must be None or an int >= 1'),
    ([{'x': np.zeros((2, 1))}, {'z': np.zeros((2, 1))}], {}, r'clients\[1\] has keys'),
    ([{'x': np.zeros((2, 1)), 'y': np.zeros(3)}], {}, 'differ in length'),
    ([{'x': np.zeros((2, 1))}, {'x': np.zeros((2, 2))}], {}, r"clients\[1\]\['x'\] is"),
    ([{'x': np.zeros((2, 1))}, {'x': np.zeros((2, 1), np.int32)}], {}, 'per example'),
    (
      _clients([3, 2, 4]),
      {'client_keys': [7, 9, 7]},
      r'client_keys lists client 7 twice \(positions 0 and 2\).*Tip: sample without replacement',
    ),
    (_clients([3, 2]), {'client_keys': [np.int64(5), 5]}, 'lists client 5 twice'),
  ],
)
def test_bad_input(clients, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fl.data.build_client_batches(clients, **{'batch_size': 2, **kwargs})


def test_check_client_batches_names_the_leaf():
  import jax
  import jax.numpy as jnp

  spec = {
    'x': jax.ShapeDtypeStruct((None, 3), jnp.float32),
    'y': jax.ShapeDtypeStruct((None,), jnp.int32),
  }
  good = fl.ClientBatches(
    {'x': np.zeros((2, 4, 8, 3), np.float32), 'y': np.zeros((2, 4, 8), np.int32)},
    np.zeros((2, 4, 8), np.float32),
  )
  fl.data.check_client_batches(good, spec)
  bad_shape = good._replace(batch={**good.batch, 'x': np.zeros((2, 4, 8, 5), np.float32)})
  with pytest.raises(ValueError, match=r"client_batches leaf \['x'\] has shape \(2, 4, 8, 5\)"):
    fl.data.check_client_batches(bad_shape, spec)
  bad_dtype = good._replace(batch={**good.batch, 'y': np.zeros((2, 4, 8), np.float32)})
  with pytest.raises(TypeError, match=r"\['y'\] has dtype float32; expected int32"):
    fl.data.check_client_batches(bad_dtype, spec)
  with pytest.raises(ValueError, match='mask has shape'):
    fl.data.check_client_batches(good._replace(mask=np.zeros((2, 4))), spec)
  with pytest.raises(TypeError, match=r'must be a fedjax_lite\.ClientBatches'):
    fl.data.check_client_batches((good.batch, good.mask), spec)


def test_batches_are_64_byte_aligned_for_zero_copy_transfer():
  batches = fl.data.build_client_batches(_clients([5, 17, 3]), batch_size=4)
  for leaf in [*batches.batch.values(), batches.mask]:
    assert leaf.ctypes.data % 64 == 0
    assert leaf.flags['C_CONTIGUOUS'] and leaf.flags['OWNDATA'] is False
