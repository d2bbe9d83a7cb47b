"""Aggregation factories against numpy reductions over the client axis."""

import jax
import numpy as np
import pytest

import fedjax_lite as fl

VALUE = {'a': np.arange(12, dtype=np.float32).reshape(4, 3), 'b': np.ones((4,), np.float32)}
WEIGHT = np.array([1.0, 0.0, 2.0, 5.0], np.float32)
SPEC = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape[1:], v.dtype), VALUE)


def test_weighted_mean():
  process = fl.aggregators.MeanFactory().create(SPEC)
  assert process.is_weighted
  out = process.next(process.initialize(), VALUE, WEIGHT)
  for k, v in VALUE.items():
    np.testing.assert_allclose(out.result[k], np.average(v, axis=0, weights=WEIGHT), rtol=1e-6)
  assert float(out.measurements['total_weight']) == WEIGHT.sum()


@pytest.mark.parametrize(('no_nan_division', 'expect_nan'), [(False, True), (True, False)])
def test_all_zero_weights(no_nan_division, expect_nan):
  process = fl.aggregators.MeanFactory(no_nan_division=no_nan_division).create(SPEC)
  out = process.next(process.initialize(), VALUE, np.zeros(4, np.float32))
  for leaf in jax.tree.leaves(out.result):
    if expect_nan:
      assert np.isnan(leaf).all()  # the finalizer rejects it: see test_fed_avg
    else:
      np.testing.assert_array_equal(leaf, 0.0)


def test_unweighted_mean_and_sum():
  mean = fl.aggregators.UnweightedMeanFactory().create(SPEC)
  total = fl.aggregators.SumFactory().create(SPEC)
  assert not mean.is_weighted and not total.is_weighted
  for k, v in VALUE.items():
    np.testing.assert_allclose(mean.next(mean.initialize(), VALUE).result[k], v.mean(axis=0))
    np.testing.assert_allclose(total.next(total.initialize(), VALUE).result[k], v.sum(axis=0))


def test_unweighted_aggregator_in_fed_avg():
  import numpy_reference as ref

  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([3, 8, 5]), batch_size=4)
  process = fl.algorithms.build_weighted_fed_avg(
    model,
    fl.optimizers.build_sgdm(0.1),
    model_aggregator=fl.aggregators.UnweightedMeanFactory(),
  )
  state = process.initialize()
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64)
  b = np.asarray(state.global_model_weights.trainable['b'], np.float64)
  state, _ = process.next(state, batches)
  w, b, _ = ref.fed_avg_round(w, b, batches, 0.1, weighting='uniform')
  np.testing.assert_allclose(state.global_model_weights.trainable['w'], w, atol=1e-5)


def test_create_rejects_missing_spec():
  with pytest.raises(ValueError, match='value_spec'):
    fl.aggregators.MeanFactory().create(None)


def test_integer_values_are_rejected():
  spec = {'count': jax.ShapeDtypeStruct((3,), np.int32)}
  with pytest.raises(TypeError, match=r"leaf \['count'\] has dtype int32"):
    fl.aggregators.MeanFactory().create(spec)


def test_tff_style_create_with_weight_spec():
  process = fl.aggregators.MeanFactory().create(SPEC, jax.ShapeDtypeStruct((), np.float32))
  out = process.next(process.initialize(), VALUE, WEIGHT)
  np.testing.assert_allclose(out.result['b'], 1.0)
