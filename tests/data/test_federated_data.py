"""InMemoryFederatedData and cohort sampling."""

import numpy as np
import pytest

import fedjax_lite as fl


def _population():
  rng = np.random.default_rng(0)
  return {
    f'user{i}': {'x': rng.standard_normal((n, 3)).astype(np.float32), 'y': np.arange(n)}
    for i, n in enumerate([4, 0, 7])
  }


def test_in_memory_population():
  clients = _population()
  data = fl.data.InMemoryFederatedData(clients)
  assert data.client_ids == ['user0', 'user1', 'user2'] and len(data) == 3
  np.testing.assert_array_equal(data.client_sizes, [4, 0, 7])
  for client_id, dataset in data:
    np.testing.assert_array_equal(dataset['x'], clients[client_id]['x'])
  assert data.get_client('user1')['x'].shape == (0, 3)  # an empty client is allowed


def test_from_arrays_groups_by_the_id_column_in_first_seen_order():
  x = np.arange(10.0)
  ids = np.array([7, 3, 7, 7, 9, 3, 7, 9, 9, 1])
  data = fl.data.InMemoryFederatedData.from_arrays({'x': x, 'y': x * 2}, client_ids=ids)
  assert data.client_ids == [7, 3, 9, 1]
  np.testing.assert_array_equal(data.client_sizes, [4, 2, 3, 1])
  np.testing.assert_array_equal(data.get_client(9)['x'], [4.0, 7.0, 8.0])
  np.testing.assert_array_equal(data.get_client(9)['y'], [8.0, 14.0, 16.0])


def test_preprocess_hooks_chain_and_leave_the_source_alone():
  data = fl.data.InMemoryFederatedData(_population())
  doubled = data.preprocess_client(lambda d: {**d, 'x': d['x'] * 2})
  shifted = doubled.preprocess_client(lambda d: {**d, 'x': d['x'] + 1})
  raw = data.get_client('user2')['x']
  np.testing.assert_allclose(shifted.get_client('user2')['x'], raw * 2 + 1)
  np.testing.assert_allclose(data.get_client('user2')['x'], raw)
  bad = data.preprocess_client(lambda d: {'x': d['x'], 'y': d['y'][:1]})
  with pytest.raises(ValueError, match='share a leading example axis'):
    bad.get_client('user0')


@pytest.mark.parametrize(
  ('clients', 'match'),
  [
    ({}, 'non-empty mapping'),
    ({'a': {'x': np.zeros((2, 3)), 'y': np.zeros(3)}}, 'share a leading example axis'),
    ({'a': {'x': np.zeros((2, 3))}, 'b': {'z': np.zeros((2, 3))}}, "client 'b' has features"),
    ({'a': {'x': np.zeros((2, 3))}, 'b': {'x': np.zeros((2, 4))}}, "feature 'x' is float64"),
    ({'a': {'x': np.zeros((2, 3))}, 'b': {'x': np.zeros((2, 3), np.int32)}}, 'per example'),
  ],
)
def test_inconsistent_clients_are_rejected(clients, match):
  with pytest.raises(ValueError, match=match):
    fl.data.InMemoryFederatedData(clients)


def test_unknown_client_names_the_id():
  data = fl.data.InMemoryFederatedData(_population())
  with pytest.raises(KeyError, match="unknown client id 'nobody'"):
    data.get_client('nobody')
  with pytest.raises(ValueError, match=r"arrays\['y'\] has shape \(2,\)"):
    fl.data.InMemoryFederatedData.from_arrays({'x': np.zeros(3), 'y': np.zeros(2)}, [1, 2, 3])


def test_cohorts_are_a_pure_function_of_seed_and_round():
  a = [fl.data.sample_cohort(1000, 100, r, seed=4) for r in range(5)]
  b = [fl.data.sample_cohort(1000, 100, r, seed=4) for r in range(5)]
  for x, y in zip(a, b, strict=True):
    np.testing.assert_array_equal(x, y)
    assert len(np.unique(x)) == 100  # without replacement
  assert not np.array_equal(a[0], a[1])
  assert not np.array_equal(a[0], fl.data.sample_cohort(1000, 100, 0, seed=5))


def test_size_weighted_sampling():
  sizes = np.zeros(50)
  sizes[:10] = 1.0
  sizes[10] = 1000.0
  cohorts = [fl.data.sample_cohort(50, 3, r, client_sizes=sizes) for r in range(200)]
  drawn = np.concatenate(cohorts)
  assert set(drawn) <= set(range(11))  # empty clients never drawn
  assert np.mean([10 in c for c in cohorts]) > 0.95  # the big client nearly always


@pytest.mark.parametrize(
  ('args', 'kwargs', 'match'),
  [
    ((10, 11, 0), {}, 'exceeds num_clients'),
    ((10, 0, 0), {}, 'cohort_size must be an int >= 1'),
    ((10, 2, -1), {}, 'round_num must be an int >= 0'),
    ((3, 2, 0), {'client_sizes': np.array([1, 0, 0])}, 'only 1 clients have examples'),
    ((3, 2, 0), {'client_sizes': np.ones(4)}, r'client_sizes must be \[num_clients\]'),
  ],
)
def test_bad_sampling_arguments(args, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fl.data.sample_cohort(*args, **kwargs)
