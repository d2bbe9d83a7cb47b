"""Mixed precision: bfloat16 forward and backward passes, float32 master weights and sums."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from tests import numpy_reference as ref


def _round(model, clients):
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.5))
  batches = fl.data.build_client_batches(clients, batch_size=4)
  state, metrics = process.next(process.initialize(), batches)
  return process.get_model_weights(state), metrics['client_work']['train']


def test_float32_compute_changes_nothing():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients([3, 7, 5])
  weights, metrics = _round(model, clients)
  same_weights, same_metrics = _round(fl.models.with_compute_dtype(model, jnp.float32), clients)
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(same_weights), strict=True):
    np.testing.assert_array_equal(a, b)
  assert metrics == same_metrics


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_weights_and_sums():
  model = fl.models.mlp_classifier(5, 3, hidden=(8,))
  mixed = fl.models.with_compute_dtype(model, jnp.bfloat16)
  x = jnp.ones((4, 5))
  jaxpr = str(jax.make_jaxpr(lambda w: mixed.predict_on_batch(w, x))(model.initial_weights))
  assert 'dot_general' in jaxpr and 'bf16[4,8]' in jaxpr  # the matmuls run in bfloat16
  assert mixed.predict_on_batch(model.initial_weights, x).dtype == jnp.float32
  clients = ref.random_clients([3, 7, 5])
  weights, metrics = _round(mixed, clients)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(weights))
  full_weights, full_metrics = _round(model, clients)
  for a, b in zip(jax.tree.leaves(weights), jax.tree.leaves(full_weights), strict=True):
    np.testing.assert_allclose(a, b, atol=0.02)  # bfloat16 has 8 bits of mantissa
    assert not np.array_equal(a, b) or not a.any()
  np.testing.assert_allclose(metrics['loss'], full_metrics['loss'], rtol=0.02)


def test_bad_dtypes_are_refused():
  with pytest.raises(ValueError, match='must be a floating dtype such as bfloat16; got int32'):
    fl.models.with_compute_dtype(ref.linear_model(5, 3), jnp.int32)


def test_the_mixed_model_takes_what_the_model_takes():
  plain = fl.models.with_compute_dtype(ref.linear_model(5, 3), jnp.bfloat16)
  assert not plain.uses_rng and not plain.uses_mask
  dropout = fl.models.with_compute_dtype(ref.dropout_linear_model(5, 3), jnp.bfloat16)
  assert dropout.uses_rng and not dropout.uses_mask
