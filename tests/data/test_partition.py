"""Dirichlet label partition: every example once, deterministic, skewed for small alpha."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl


@settings(max_examples=20, deadline=None)
@given(
  num_clients=st.integers(1, 12),
  alpha=st.sampled_from([0.1, 1.0, 100.0]),
  seed=st.integers(0, 5),
)
def test_every_example_exactly_once_and_seeded(num_clients, alpha, seed):
  labels = np.random.default_rng(seed).integers(0, 5, 300)
  parts = fl.data.dirichlet_label_partition(labels, num_clients, alpha, seed=seed)
  assert len(parts) == num_clients and min(map(len, parts)) >= 1
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(300))
  again = fl.data.dirichlet_label_partition(labels, num_clients, alpha, seed=seed)
  for a, b in zip(parts, again, strict=True):
    np.testing.assert_array_equal(a, b)


def test_small_alpha_is_skewed():
  labels = np.repeat(np.arange(10), 100)

  def mean_classes_per_client(alpha):
    parts = fl.data.dirichlet_label_partition(labels, 20, alpha, seed=0)
    # Classes holding at least 5% of a client's examples.
    return np.mean([np.sum(np.bincount(labels[p], minlength=10) >= 0.05 * len(p)) for p in parts])

  assert mean_classes_per_client(0.1) < 4 < 9 < mean_classes_per_client(100.0)


@pytest.mark.parametrize(
  ('kwargs', 'match'),
  [
    ({'alpha': 0.0}, 'alpha must be > 0'),
    ({'num_clients': 0}, 'num_clients must be an int >= 1'),
    ({'num_clients': 50, 'min_size': 1}, 'cannot give 50 clients'),
  ],
)
def test_bad_input(kwargs, match):
  with pytest.raises(ValueError, match=match):
    fl.data.dirichlet_label_partition(
      np.zeros(20, int), **{'num_clients': 2, 'alpha': 1.0, **kwargs}
    )


def _assert_exact_cover(parts, n):
  np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(n))


@settings(max_examples=20, deadline=None)
@given(num_clients=st.integers(1, 20), extra=st.integers(0, 200), seed=st.integers(0, 3))
def test_iid_and_power_law_cover_every_example_once(num_clients, extra, seed):
  n = num_clients + extra
  iid = fl.data.iid_partition(n, num_clients, seed=seed)
  _assert_exact_cover(iid, n)
  assert max(map(len, iid)) - min(map(len, iid)) <= 1
  skewed = fl.data.power_law_partition(n, num_clients, seed=seed)
  _assert_exact_cover(skewed, n)
  assert min(map(len, skewed)) >= 1
  again = fl.data.power_law_partition(n, num_clients, seed=seed)
  assert [len(p) for p in again] == [len(p) for p in skewed]


def test_power_law_sizes_are_skewed():
  sizes = np.sort([len(p) for p in fl.data.power_law_partition(100_000, 1000, seed=0)])
  # The largest 10% of clients hold far more than 10% of the examples.
  assert sizes[-100:].sum() > 0.3 * sizes.sum()


def test_label_shards_give_each_client_few_classes():
  labels = np.repeat(np.arange(10), 60)
  parts = fl.data.label_shards_partition(labels, num_clients=30, shards_per_client=2, seed=1)
  _assert_exact_cover(parts, len(labels))
  assert max(len(np.unique(labels[p])) for p in parts) <= 4  # 2 shards, each within <= 2 labels
  again = fl.data.label_shards_partition(labels, num_clients=30, shards_per_client=2, seed=1)
  for a, b in zip(parts, again, strict=True):
    np.testing.assert_array_equal(a, b)


def test_natural_partition():
  parts = fl.data.natural_partition(np.array(['bob', 'amy', 'bob', 'cat', 'amy']))
  assert list(parts) == ['bob', 'amy', 'cat']
  np.testing.assert_array_equal(parts['amy'], [1, 4])


@pytest.mark.parametrize(
  ('fn', 'kwargs', 'match'),
  [
    (fl.data.iid_partition, {'num_examples': 3, 'num_clients': 4}, 'num_examples must be'),
    (fl.data.label_shards_partition, {'labels': np.zeros(3), 'num_clients': 2}, '4 shards need'),
    (
      fl.data.power_law_partition,
      {'num_examples': 10, 'num_clients': 2, 'exponent': 0},
      'exponent',
    ),
    (fl.data.power_law_partition, {'num_examples': 3, 'num_clients': 4}, 'cannot give 4 clients'),
    (fl.data.natural_partition, {'keys': np.zeros((2, 2))}, 'keys must be 1-D'),
  ],
)
def test_partitioner_bad_input(fn, kwargs, match):
  with pytest.raises(ValueError, match=match):
    fn(**kwargs)
