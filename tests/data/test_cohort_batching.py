"""Cohort batching from a `FederatedData`: seeding by client id, bucketing, per-batch hooks."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl


def _population(sizes, seed=0):
  """Client `f'c{i}'` holds examples whose `x[:, 0]` is the unique id `1000 * i + j`."""
  rng = np.random.default_rng(seed)
  clients = {}
  for i, n in enumerate(sizes):
    x = rng.standard_normal((n, 5)).astype(np.float32)
    x[:, 0] = 1000 * i + np.arange(n)
    clients[f'c{i}'] = {'x': x, 'y': rng.integers(0, 3, n).astype(np.int32)}
  return fl.data.InMemoryFederatedData(clients)


def test_every_example_num_epochs_times_exact_masks():
  data = _population([5, 0, 12, 7])
  ids = ['c2', 'c0', 'c3', 'c1']
  batches = fl.data.batch_cohort(data, ids, batch_size=4, num_epochs=3, round_num=2, seed=1)
  assert batches.mask.shape == (4, 9, 4)  # c2: ceil(12 * 3 / 4) = 9 steps
  for row, client in enumerate(ids):
    n = int(data.client_sizes[data.client_ids.index(client)])
    flat_mask = batches.mask[row].reshape(-1)
    np.testing.assert_array_equal(flat_mask, np.arange(flat_mask.size) < 3 * n)
    got = batches.batch['x'][row, ..., 0].reshape(-1)[: 3 * n]
    i = int(client[1:])
    np.testing.assert_array_equal(np.bincount(got.astype(int) - 1000 * i, minlength=n), 3)


def test_max_steps_cuts_clients():
  data = _population([30, 3])
  batches = fl.data.batch_cohort(data, ['c0', 'c1'], batch_size=4, num_epochs=2, max_steps=5)
  np.testing.assert_array_equal(batches.mask.sum(axis=(1, 2)), [20, 6])


def test_shuffle_seeded_by_seed_round_and_client_id_not_position():
  data = _population([9, 9, 9])

  def order(ids, **kw):
    batches = fl.data.batch_cohort(data, ids, batch_size=3, **kw)
    return {c: batches.batch['x'][r, ..., 0].reshape(-1) for r, c in enumerate(ids)}

  a = order(['c0', 'c1'], round_num=4, seed=7)
  b = order(['c2', 'c1', 'c0'], round_num=4, seed=7)
  np.testing.assert_array_equal(a['c0'], b['c0'])
  np.testing.assert_array_equal(a['c1'], b['c1'])
  assert not np.array_equal(a['c0'], order(['c0'], round_num=5, seed=7)['c0'])
  assert not np.array_equal(a['c0'], order(['c0'], round_num=4, seed=8)['c0'])


def test_client_key_is_stable_across_processes():
  # blake2b, not Python's salted hash: pinned values guard resumability across processes.
  assert fl.data.client_key('alice') == 4966672586037949734
  assert fl.data.client_key(b'alice') == fl.data.client_key('alice')
  assert fl.data.client_key(12) == 12
  assert fl.data.client_key(np.int64(12)) == 12
  with pytest.raises(TypeError, match='client ids must be int, str or bytes; got float'):
    fl.data.client_key(1.5)


def test_step_buckets():
  assert fl.data.step_buckets(100) == (13, 25, 50, 100)
  assert fl.data.step_buckets(3, num_buckets=5) == (1, 2, 3)
  assert fl.data.step_buckets(7, num_buckets=1) == (7,)
  with pytest.raises(ValueError, match='num_buckets must be an int >= 1; got 0'):
    fl.data.step_buckets(7, num_buckets=0)


def test_bucketing_matches_unbucketed_training_with_less_padding():
  sizes = [len(p) for p in fl.data.power_law_partition(3000, 60, exponent=1.2, seed=0)]
  data = _population(sizes)
  batch_size, epochs = 4, 1
  longest = fl.data.client_steps(max(sizes), epochs, batch_size)
  buckets = fl.data.step_buckets(longest, num_buckets=4)
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.05), client_chunk_size=4
  )
  states = {'fixed': process.initialize(), 'bucketed': process.initialize()}
  padding = {'fixed': [], 'bucketed': []}
  shapes = set()
  for round_num in range(8):
    cohort = fl.data.sample_cohort(len(sizes), 10, round_num, seed=3)
    ids = [data.client_ids[i] for i in cohort]
    kw = dict(batch_size=batch_size, num_epochs=epochs, round_num=round_num, seed=3)
    for name, b in [('fixed', [longest]), ('bucketed', buckets)]:
      batches = fl.data.batch_cohort(data, ids, buckets=b, **kw)
      padding[name].append(fl.data.padding_fraction(batches))
      states[name] = process.next(states[name], batches).state
      if name == 'bucketed':
        shapes.add(batches.mask.shape)
        real = fl.data.batch_cohort(data, ids, **kw).mask.shape[1]
        assert batches.mask.shape[1] == min(s for s in buckets if s >= real)
  fixed, bucketed = (process.get_model_weights(states[k]).trainable for k in states)
  for k in fixed:
    np.testing.assert_allclose(fixed[k], bucketed[k], rtol=1e-6, atol=1e-6)
  assert len(shapes) <= len(buckets)
  assert np.mean(padding['bucketed']) < np.mean(padding['fixed']) - 0.05  # 0.85 vs 0.96
  # The same figure from the masks directly.
  mask = fl.data.batch_cohort(data, ids, buckets=buckets, **kw).mask
  assert fl.data.padding_fraction(fl.ClientBatches({}, mask)) == pytest.approx(1 - mask.mean())


def test_longest_client_beyond_buckets_is_an_error():
  data = _population([40])
  with pytest.raises(ValueError, match=r'takes 10 steps, more than the largest bucket \(8\)'):
    fl.data.batch_cohort(data, ['c0'], batch_size=4, buckets=[2, 8])
  with pytest.raises(ValueError, match='client_ids is empty'):
    fl.data.batch_cohort(data, [], batch_size=4)
  with pytest.raises(KeyError, match="unknown client id 'nobody'"):
    fl.data.batch_cohort(data, ['nobody'], batch_size=4)


def test_preprocess_batch_hooks_apply_to_the_cohort_in_order():
  pixels = {
    'a': {'px': np.full((3, 2), 255, np.uint8), 'y': np.array([0, 1, 2], np.int32)},
    'b': {'px': np.zeros((1, 2), np.uint8), 'y': np.array([1], np.int32)},
  }
  base = fl.data.InMemoryFederatedData(pixels)
  data = base.preprocess_batch(
    lambda b: {'x': b['px'].astype(np.float32) / 255.0, 'y': b['y']}
  ).preprocess_batch(lambda b: {**b, 'x2': 2 * b['x']})
  batches = fl.data.batch_cohort(data, ['a', 'b'], batch_size=2, shuffle=False)
  assert sorted(batches.batch) == ['x', 'x2', 'y']
  assert batches.batch['x'].shape == (2, 2, 2, 2) and batches.batch['x'].dtype == np.float32
  np.testing.assert_array_equal(batches.batch['x'][0].reshape(-1, 2)[:3], 1.0)
  np.testing.assert_array_equal(batches.batch['x2'], 2 * batches.batch['x'])
  np.testing.assert_array_equal(batches.batch['x'][batches.mask == 0], 0.0)  # padding: zeros
  assert batches.batch['x'].ctypes.data % 64 == 0  # still zero-copy for device_put
  # The base population is unchanged; hooks that change the row count are refused.
  assert sorted(fl.data.batch_cohort(base, ['a'], batch_size=2).batch) == ['px', 'y']
  dropping = base.preprocess_batch(lambda b: {k: v[:1] for k, v in b.items()})
  with pytest.raises(ValueError, match='returned 1 rows for 3; batch hooks must map rows'):
    fl.data.batch_cohort(dropping, ['a'], batch_size=2)
  with pytest.raises(TypeError, match='fn must be callable'):
    base.preprocess_batch('scale')


def test_batch_cohort_output_runs_a_round():
  data = _population([6, 2])
  batches = jax.device_put(fl.data.batch_cohort(data, ['c0', 'c1'], batch_size=4))
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1)
  )
  _, metrics = process.next(process.initialize(), batches)
  assert int(metrics['client_work']['train']['num_examples']) == 8


def test_a_client_listed_twice_in_a_cohort_is_refused():
  """A cohort samples without replacement (fl.data.sample_cohort): a repeated client would
  train twice and count twice in the aggregate."""
  data = _population([5, 3, 4])
  with pytest.raises(ValueError, match=r"client_ids lists client 'c2' twice \(positions 0 and 2\)"):
    fl.data.batch_cohort(data, ['c2', 'c0', 'c2'], batch_size=4)
  cohort = fl.data.sample_cohort(data.num_clients, 3, round_num=0)
  ids = [data.client_ids[i] for i in cohort]
  assert fl.data.batch_cohort(data, ids, batch_size=4).mask.shape[0] == 3
