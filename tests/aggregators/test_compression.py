"""Stochastic quantization with and without the Hadamard rotation: unbiased, the stated bits,
exact Hadamard inverse, streamed like the other factories."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl
from fedjax_lite.aggregators import _compression

AGG = fl.aggregators


def test_hadamard_transform_is_orthonormal_and_its_own_inverse():
  x = jnp.asarray(np.random.default_rng(0).standard_normal(64), jnp.float32)
  h = np.array([[1.0]])
  while h.shape[0] < 64:
    h = np.block([[h, h], [h, -h]])
  np.testing.assert_allclose(_compression.fwht(x), h @ np.asarray(x) / 8.0, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(_compression.fwht(_compression.fwht(x)), x, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('bits', [1, 2, 4])
def test_quantization_uses_the_stated_levels_and_is_unbiased(bits):
  x = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, 50), jnp.float32)
  draws = jax.vmap(lambda k: _compression.stochastic_quantize(x, bits, k))(
    jax.random.split(jax.random.PRNGKey(0), 4000)
  )
  low, high = float(x.min()), float(x.max())
  step = (high - low) / (2**bits - 1)
  levels = (np.asarray(draws) - low) / step
  np.testing.assert_allclose(levels, np.round(levels), atol=1e-3)  # on the grid
  assert len(np.unique(np.round(levels))) <= 2**bits
  # Unbiased: the mean of 4,000 draws is within 4 standard errors of x.
  stderr = step / 2 / math.sqrt(4000)
  assert np.max(np.abs(np.asarray(draws).mean(0) - np.asarray(x))) < 4 * stderr + 1e-6


@pytest.mark.parametrize('rotation', ['none', 'hadamard'])
def test_quantized_sum_is_unbiased_and_reports_its_bits(rotation):
  values = {
    'w': np.random.default_rng(2).standard_normal((4, 300)).astype(np.float32),
    'b': np.ones((4, 5), np.float32),
  }
  spec = fl.tree.tree_specs(jax.tree.map(lambda x: x[0], values))
  process = AGG.QuantizationFactory(bits=4, threshold=100, rotation=rotation).create(spec)
  state = process.initialize()
  total = np.zeros(300)
  for _ in range(300):
    out = process.next(state, values)
    state = out.state
    total += np.asarray(out.result['w'])
    np.testing.assert_array_equal(out.result['b'], 4.0)  # below the threshold: exact
  np.testing.assert_allclose(total / 300, values['w'].sum(0), atol=0.12)
  padded = 512 if rotation == 'hadamard' else 300
  sent = padded * 4 + 64 + 32 * 5
  assert float(out.measurements['bits_per_client']) == sent
  assert float(out.measurements['compression_ratio']) == pytest.approx(32 * 305 / sent)


def test_sixteen_bits_with_rotation_is_nearly_lossless():
  values = {'w': np.random.default_rng(3).standard_normal((3, 1000)).astype(np.float32)}
  spec = fl.tree.tree_specs(jax.tree.map(lambda x: x[0], values))
  process = AGG.QuantizationFactory(bits=16, threshold=0, rotation='hadamard').create(spec)
  out = process.next(process.initialize(), values)
  np.testing.assert_allclose(out.result['w'], values['w'].sum(0), atol=1e-3)


def test_compression_aggregator_trains_and_streams_like_its_stacked_form():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 2, 14, 5, 7]), batch_size=4)
  quantized = AGG.MeanFactory(value_sum_factory=AGG.QuantizationFactory(bits=2, threshold=1))
  streamed = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=quantized
  )
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
  stacked = fl.templates.compose_learning_process(
    lambda: model.initial_weights,
    fl.templates.build_broadcast_process(fl.tree.tree_specs(model.initial_weights)),
    work._replace(streams=False),
    quantized.create(model.initial_weights.trainable),
    fl.templates.build_apply_optimizer_finalizer(
      fl.optimizers.build_sgdm(1.0), model.initial_weights
    ),
  )
  s1, m1 = streamed.next(streamed.initialize(), batches)
  s2, _ = stacked.next(stacked.initialize(), batches)
  # Client c draws its rounding from its id in both paths (positions here), so they agree.
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert 'bits_per_client' in m1['aggregator']['mean_value']
  preset = AGG.compression_aggregator()
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=preset
  )
  _, metrics = process.next(process.initialize(), batches)
  assert set(metrics['aggregator']) == {'zeroing', 'zeroing_norm', 'zeroed_count'}


@pytest.mark.parametrize(
  'kwargs', [{'bits': 0}, {'bits': 17}, {'threshold': -1}, {'rotation': 'fourier'}]
)
def test_bad_quantization_arguments(kwargs):
  with pytest.raises(ValueError):
    AGG.QuantizationFactory(**kwargs)
