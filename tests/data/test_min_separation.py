"""`sample_cohort(..., min_separation=b)`: the cyclic (balls-in-bins) schedule of DP-FTRL."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl


@settings(max_examples=60, deadline=None)
@given(
  num_clients=st.integers(1, 60),
  b=st.integers(1, 8),
  seed=st.integers(0, 2**32 - 1),
  data=st.data(),
)
def test_no_client_joins_two_cohorts_closer_than_b_rounds_and_the_draw_is_the_seeds(
  num_clients, b, seed, data
):
  b = min(b, num_clients)
  cohort_size = data.draw(st.integers(1, num_clients // b))
  rounds = 3 * b + 2
  last_seen = {}
  for r in range(rounds):
    cohort = fl.data.sample_cohort(num_clients, cohort_size, r, seed, min_separation=b)
    assert len(set(cohort.tolist())) == cohort_size and cohort.dtype == np.int64
    for c in cohort.tolist():
      assert 0 <= c < num_clients
      if b > 1:
        assert c not in last_seen or r - last_seen[c] >= b
      last_seen[c] = r
    again = fl.data.sample_cohort(num_clients, cohort_size, r, seed, min_separation=b)
    np.testing.assert_array_equal(cohort, again)  # a pure function of (seed, round)


def test_groups_partition_the_clients_and_round_r_draws_from_group_r_mod_b():
  groups = fl.data.min_separation_groups(103, 5, seed=7)
  assert sorted(np.concatenate(groups).tolist()) == list(range(103))
  assert {len(g) for g in groups} == {20, 21}
  for r in range(12):
    cohort = fl.data.sample_cohort(103, 20, r, seed=7, min_separation=5)
    assert set(cohort.tolist()) <= set(groups[r % 5].tolist())
  assert not np.array_equal(groups[0], fl.data.min_separation_groups(103, 5, seed=8)[0])
  # Every client of a full-group cohort joins once every b rounds: k = ceil(rounds / b).
  joins = np.zeros(103, int)
  for r in range(11):
    joins[fl.data.sample_cohort(103, 20, r, seed=7, min_separation=5)] += 1
  assert joins.max() <= 3


def test_min_separation_one_is_todays_draw_bit_for_bit():
  for r in range(5):
    want = np.random.default_rng([3, r]).choice(50, 7, replace=False)
    np.testing.assert_array_equal(fl.data.sample_cohort(50, 7, r, seed=3), want)
    np.testing.assert_array_equal(fl.data.sample_cohort(50, 7, r, 3, min_separation=1), want)
  sizes = np.arange(50.0)
  want = np.random.default_rng([3, 2]).choice(50, 7, replace=False, p=sizes / sizes.sum())
  np.testing.assert_array_equal(fl.data.sample_cohort(50, 7, 2, 3, sizes, min_separation=1), want)


def test_client_sizes_are_refused_with_min_separation():
  """A draw weighted by the clients' data would make the schedule depend on that data."""
  with pytest.raises(
    ValueError, match=r'client_sizes must be None with min_separation=4 > 1; got an array'
  ):
    fl.data.sample_cohort(40, 3, 0, 1, np.ones(40), min_separation=4)


def test_a_schedule_it_cannot_draw_is_refused():
  with pytest.raises(
    ValueError,
    match=r'cohort_size=11 exceeds the smallest of the '
    r'min_separation=10 groups of num_clients=105 clients \(10 clients\)',
  ):
    fl.data.sample_cohort(105, 11, 0, min_separation=10)
  with pytest.raises(ValueError, match='min_separation must be an int >= 1; got 0'):
    fl.data.sample_cohort(10, 2, 0, min_separation=0)
  with pytest.raises(ValueError, match='min_separation=11 exceeds num_clients=10'):
    fl.data.sample_cohort(10, 1, 0, min_separation=11)
