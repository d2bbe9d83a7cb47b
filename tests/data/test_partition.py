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
