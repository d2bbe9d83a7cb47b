"""The simulated secure sum: exact to its fixed-point step, clipping counted, wrap-around seen."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

AGG = fl.aggregators
VALUES = {'w': np.random.default_rng(0).uniform(-1, 1, (6, 9)).astype(np.float32)}
SPEC = fl.tree.tree_specs(jax.tree.map(lambda x: x[0], VALUES))


def _numpy_secure_sum(values, lower, upper, bits):
  step = (upper - lower) / (2**bits - 1)
  codes = np.round((np.clip(values, lower, upper) - lower) / step)
  return codes.sum(0) * step + len(values) * lower


@pytest.mark.parametrize(('upper', 'lower'), [(2.0, None), (0.5, None), (0.8, -0.2)])
def test_secure_sum_is_the_clipped_fixed_point_sum(upper, lower):
  process = AGG.SecureSumFactory(upper, lower, bits=16).create(SPEC)
  out = process.next(process.initialize(), VALUES)
  low = -upper if lower is None else lower
  want = _numpy_secure_sum(VALUES['w'].astype(np.float64), low, upper, 16)
  step = (upper - low) / (2**16 - 1)
  np.testing.assert_allclose(out.result['w'], want, atol=step + 1e-5)
  assert int(out.measurements['secure_upper_clipped_count']) == int(
    (VALUES['w'].max(1) > upper).sum()
  )
  assert int(out.measurements['secure_lower_clipped_count']) == int(
    (VALUES['w'].min(1) < low).sum()
  )
  assert float(out.measurements['secure_lower_threshold']) == pytest.approx(low)
  assert int(out.measurements['secure_overflow']) == 0


def test_too_many_bits_wrap_around_and_are_reported():
  process = AGG.SecureSumFactory(1.0, bits=31).create(SPEC)
  out = process.next(process.initialize(), VALUES)
  wrapped = int(out.measurements['secure_overflow'])
  assert wrapped > 0
  wrong = np.abs(np.asarray(out.result['w']) - VALUES['w'].sum(0)) > 0.5
  assert wrong.sum() == wrapped  # exactly the coordinates reported wrap


def test_adaptive_bound_follows_the_largest_values():
  bound = AGG.PrivateQuantileEstimationProcess.no_noise(0.1, 0.95, 1.0)
  process = AGG.SecureSumFactory(bound).create(SPEC)
  state = process.initialize()
  for _ in range(6):
    out = process.next(state, VALUES)
    state = out.state
  assert float(out.measurements['secure_upper_threshold']) > 0.5  # grew toward max |v| ~ 1


def test_secure_aggregator_is_the_mean_to_its_fixed_point_step():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 2, 14, 5, 7]), batch_size=4)
  plain = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  secure = fl.algorithms.build_weighted_fed_avg(
    model,
    fl.optimizers.build_sgdm(0.1),
    model_aggregator=AGG.secure_aggregator(zeroing=False, clipping=False),
  )
  s1, _ = plain.next(plain.initialize(), batches)
  s2, metrics = secure.next(secure.initialize(), batches)
  w1, w2 = plain.get_model_weights(s1).trainable, secure.get_model_weights(s2).trainable
  # Bound 100 (50 reported x2), 20 bits: a step of 2e-4 per weighted value, over 37 examples.
  for k in w1:
    np.testing.assert_allclose(w2[k], w1[k], atol=5e-5)
  assert float(metrics['aggregator']['mean_value']['secure_upper_threshold']) == 100.0
  full = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=AGG.secure_aggregator()
  )
  _, metrics = full.next(full.initialize(), batches)
  assert int(metrics['aggregator']['zeroing']['clipping']['mean_value']['secure_overflow']) == 0


@pytest.mark.parametrize(
  'kwargs',
  [
    {'upper_bound_threshold': 1.0, 'lower_bound_threshold': 2.0},
    {'upper_bound_threshold': -1.0},
    {'upper_bound_threshold': float('nan')},
    {'upper_bound_threshold': 1.0, 'bits': 0},
    {'upper_bound_threshold': 1.0, 'bits': 33},
  ],
)
def test_bad_secure_arguments(kwargs):
  with pytest.raises(ValueError):
    AGG.SecureSumFactory(**kwargs)
