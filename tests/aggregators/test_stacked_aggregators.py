"""Stacked aggregators (median, trimmed mean, Krum) and means over the clients that take part:
the clients outside `client_mask` (padding, clients without an example) are neither counted nor
ranked. Krum refuses a cohort too small for its Byzantine bound."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

AGG = fl.aggregators
RNG = np.random.default_rng(1)
# Eight clients; the ones at MASK False stand for padding (zeros) and must change nothing.
VALUES = {
  'a': RNG.standard_normal((8, 3, 2)).astype(np.float32),
  'b': RNG.standard_normal((8, 4)).astype(np.float32),
}
MASK = np.array([True, True, False, True, True, False, True, True])
VALUES = {k: np.where(MASK.reshape(-1, *[1] * (v.ndim - 1)), v, 0) for k, v in VALUES.items()}
SPEC = fl.tree.tree_specs(jax.tree.map(lambda x: x[0], VALUES))
PRESENT = {k: v[MASK] for k, v in VALUES.items()}  # the 6 clients that take part


def _close(got, want, **tol):
  for k in want:
    np.testing.assert_allclose(got[k], want[k], **(tol or {'rtol': 1e-5, 'atol': 1e-6}))


def _next(factory, mask=MASK, values=VALUES):
  process = factory.create(SPEC)
  return process.next(process.initialize(), values, client_mask=mask)


def _krum_reference(values, num_byzantine, num_selected):
  """Krum over the rows of `values` (numpy): the mean of the lowest-scoring rows."""
  n = len(next(iter(values.values())))
  flat = np.concatenate([v.reshape(n, -1) for v in values.values()], axis=1).astype(np.float64)
  d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  scores = [np.sort(np.delete(d[i], i))[: n - num_byzantine - 2].sum() for i in range(n)]
  chosen = np.argsort(scores, kind='stable')[:num_selected]
  return {k: v[chosen].mean(axis=0) for k, v in values.items()}


def test_median_and_trimmed_mean_rank_only_the_clients_that_take_part():
  _close(_next(AGG.median_factory()).result, {k: np.median(v, 0) for k, v in PRESENT.items()})
  # 6 clients take part: trim floor(0.2 * 6) = 1 each side (2 of 8 with the padding counted).
  want = {k: np.sort(v, axis=0)[1:5].mean(axis=0) for k, v in PRESENT.items()}
  _close(_next(AGG.trimmed_mean_factory(0.2)).result, want)
  # An odd count: the middle value itself.
  odd = MASK & (np.arange(8) != 0)
  _close(
    _next(AGG.median_factory(), odd).result, {k: np.median(v[odd], 0) for k, v in VALUES.items()}
  )
  # Without a mask every client counts (TFF's stacked next, called directly).
  process = AGG.median_factory().create(SPEC)
  _close(process.next((), VALUES).result, {k: np.median(v, 0) for k, v in VALUES.items()})


@pytest.mark.parametrize('num_selected', [1, 3])
def test_krum_scores_and_chooses_only_the_clients_that_take_part(num_selected):
  out = _next(AGG.krum_factory(1, num_selected=num_selected))
  _close(out.result, _krum_reference(PRESENT, 1, num_selected), rtol=1e-5, atol=1e-5)
  assert int(out.measurements['byzantine_tolerance_met']) == 1  # 6 > 2 * 1 + 2
  # Two of eight left: the bound holds for the cohort, not for the clients that took part;
  # both score the same (their distance), the first is chosen first, and no absent one is.
  few = np.zeros(8, bool)
  few[[0, 3]] = True
  out = _next(AGG.krum_factory(1, num_selected=num_selected), few)
  assert int(out.measurements['byzantine_tolerance_met']) == 0
  _close(out.result, {k: v[[0, 3][:num_selected]].mean(axis=0) for k, v in VALUES.items()})
  # A lone client is chosen, never a client outside the mask.
  lone = np.arange(8) == 4
  out = _next(AGG.krum_factory(1, num_selected=num_selected), lone)
  _close(out.result, {k: v[4] for k, v in VALUES.items()})


@pytest.mark.parametrize(
  'factory',
  [
    AGG.median_factory,
    lambda: AGG.trimmed_mean_factory(0.2),
    lambda: AGG.krum_factory(1),
    AGG.UnweightedMeanFactory,
  ],
  ids=['median', 'trimmed_mean', 'krum', 'unweighted_mean'],
)
def test_a_round_without_any_client_aggregates_to_zeros(factory):
  out = _next(factory(), np.zeros(8, bool))
  for leaf in jax.tree.leaves(out.result):
    np.testing.assert_array_equal(leaf, 0.0)


def test_means_count_only_the_clients_that_take_part():
  mean = {k: v.mean(axis=0) for k, v in PRESENT.items()}
  _close(_next(AGG.UnweightedMeanFactory()).result, mean)  # streaming parts, stacked next

  class StackedSum:  # an inner sum that needs every client: the mean's own stacked path
    def create(self, value_spec):
      def next_fn(state, value, *, client_mask=None):
        total = fl.tree.tree_sum_over_clients(value, client_mask)
        return fl.templates.MeasuredProcessOutput(state, total, {})

      return fl.templates.AggregationProcess(lambda: (), next_fn, False)

  _close(_next(AGG.UnweightedMeanFactory(value_sum_factory=StackedSum())).result, mean)
  weights = np.arange(1.0, 9.0, dtype=np.float32)
  weighted = AGG.MeanFactory().create(SPEC)
  out = weighted.next(weighted.initialize(), VALUES, weights, client_mask=MASK)
  _close(out.result, {k: np.average(v, 0, weights[MASK]) for k, v in PRESENT.items()})
  assert float(out.measurements['total_weight']) == weights[MASK].sum()


def test_an_adaptive_norm_around_a_median_counts_only_the_clients_that_take_part():
  """The norm-bound factory's stacked path: its quantile estimate and its clipped count see the
  clients of the mask only (padding has norm 0, which would count as below the clip)."""
  estimator = AGG.PrivateQuantileEstimationProcess.no_noise(1.0, 0.5, 0.5)
  factory = AGG.clipping_factory(estimator, AGG.median_factory())
  masked, alone = factory.create(SPEC), factory.create(SPEC)
  m1 = masked.next(masked.initialize(), VALUES, client_mask=MASK)
  m2 = alone.next(alone.initialize(), PRESENT)
  for a, b in zip(jax.tree.leaves(m1), jax.tree.leaves(m2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  norms = np.sqrt(sum((v.reshape(6, -1) ** 2).sum(1) for v in PRESENT.values()))
  assert int(m1.measurements['clipped_count']) == int((norms > 1.0).sum())


def test_krum_refuses_a_cohort_too_small_for_its_byzantine_bound():
  with pytest.raises(ValueError, match=r'num_byzantine=2 needs more than .* = 6 clients.*is 6'):
    AGG.krum_factory(2, clients_per_round=6)
  AGG.krum_factory(2, clients_per_round=7)
  process = AGG.krum_factory(3).create(SPEC)  # built: made-up cohorts are large enough
  with pytest.raises(ValueError, match=r'num_byzantine=3 needs more than .* = 8 clients.*is 8'):
    process.next((), VALUES)
  with pytest.raises(ValueError, match=r'Tip: lower num_byzantine to at most 2'):
    process.next((), VALUES)


def test_krum_in_a_learning_process_refuses_a_small_cohort_when_the_round_is_traced():
  model = ref.linear_model(5, 3)
  process = fl.algorithms.build_unweighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=AGG.krum_factory(1)
  )
  small = fl.data.build_client_batches(ref.random_clients([3, 4, 5, 6]), batch_size=4)
  with pytest.raises(ValueError, match=r'num_byzantine=1 needs more than .* = 4 clients.*is 4'):
    process.next(process.initialize(), small)
  large = fl.data.build_client_batches(ref.random_clients([3, 4, 5, 6, 7]), batch_size=4)
  state, metrics = process.next(process.initialize(), large)
  assert int(metrics['aggregator']['byzantine_tolerance_met']) == 1
  assert np.isfinite(np.asarray(process.get_model_weights(state).trainable['w'])).all()


def test_stacked_aggregators_skip_the_empty_clients_of_a_round():
  """A round with empty clients (padding, or clients without an example) equals the round of
  its other clients, on one device (every aggregator on every layout: test_sharding.py)."""
  model = ref.linear_model(5, 3)
  sizes = [9, 2, 14, 5, 7, 4, 6]
  clients = ref.random_clients(sizes)
  empty = {k: v[:0] for k, v in clients[0].items()}
  keys = list(range(100, 107))
  plain = fl.data.build_client_batches(clients, batch_size=4, client_keys=keys)
  padded = fl.data.build_client_batches(
    [clients[0], empty, *clients[1:4], empty, *clients[4:]],
    batch_size=4,
    client_keys=[100, 7, 101, 102, 103, 8, 104, 105, 106],
  )
  for factory in [AGG.median_factory(), AGG.UnweightedMeanFactory()]:
    outs = []
    for batches in (plain, padded):
      process = fl.algorithms.build_unweighted_fed_avg(
        model, fl.optimizers.build_sgdm(0.1), model_aggregator=factory
      )
      state, metrics = process.next(process.initialize(), batches)
      outs.append(jax.tree.leaves((state, metrics)))
    for a, b in zip(*outs, strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_user_stacked_aggregator_without_client_mask_still_runs():
  """An aggregation `next` written without `client_mask` is called without it."""

  def next_fn(state, value):
    return fl.templates.MeasuredProcessOutput(state, jax.tree.map(lambda x: x[0], value), {})

  process = fl.templates.AggregationProcess(lambda: (), next_fn, False)
  out = process.next((), VALUES, client_mask=MASK)
  _close(out.result, {k: v[0] for k, v in VALUES.items()})
  assert jnp.shape(out.result['a']) == (3, 2)
