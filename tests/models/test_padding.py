"""Padding changes nothing: batch statistics see the mask, and a model whose loss or layers
would count padded examples is refused when a process is built."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from flax import nnx

import fedjax_lite as fl
from tests import numpy_reference as ref

SPEC = {
  'x': jax.ShapeDtypeStruct((None, 3), jnp.float32),
  'y': jax.ShapeDtypeStruct((None,), jnp.int32),
}


class LinenBatchNorm(nn.Module):
  @nn.compact
  def __call__(self, x, train=True):
    x = nn.BatchNorm(use_running_average=not train)(nn.Dense(4)(x))
    return nn.Dense(3)(x)


class NnxBatchNorm(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.dense = nnx.Linear(3, 4, rngs=rngs)
    self.norm = nnx.BatchNorm(4, rngs=rngs)
    self.out = nnx.Linear(4, 3, rngs=rngs)

  def __call__(self, x):
    return self.out(self.norm(self.dense(x)))


def batch_norm_models():
  loss = fl.models.softmax_cross_entropy
  return {
    'linen': fl.models.from_flax(
      LinenBatchNorm(), input_spec=SPEC, loss_fn=loss, training_arg='train'
    ),
    'nnx': fl.models.from_flax(NnxBatchNorm(), input_spec=SPEC, loss_fn=loss),
  }


@pytest.mark.parametrize('kind', ['linen', 'nnx'])
def test_batch_norm_trains_the_same_at_any_padded_batch_size(kind):
  # One 4-example client trained one step at batch sizes 4, 16 and 64: the padded rows must not
  # enter the batch statistics (before the fix the losses were 2.99 / 3.49 / 5.25).
  model = batch_norm_models()[kind]
  client = ref.random_clients([4], num_features=3, num_classes=3, seed=1)
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.5))
  results = []
  for batch_size in (4, 16, 64):
    batches = fl.data.build_client_batches(client, batch_size=batch_size, shuffle=False)
    state, metrics = process.next(process.initialize(), batches)
    results.append((metrics['client_work']['train']['loss'], process.get_model_weights(state)))
  (loss, weights), *others = results
  for other_loss, other_weights in others:
    np.testing.assert_allclose(other_loss, loss, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(other_weights), jax.tree.leaves(weights), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def _linear_with(loss_fn=fl.models.softmax_cross_entropy, predict=None):
  base = ref.linear_model(3, 3)

  def linear(weights, x, training=True):
    return x @ weights.trainable['w'] + weights.trainable['b']

  return fl.FunctionalModel(
    initial_weights=base.initial_weights,
    predict_on_batch_fn=predict or linear,
    loss_fn=loss_fn,
    input_spec=SPEC,
  )


def test_a_loss_ignoring_sample_weight_is_refused_at_build():
  def unweighted(logits, labels, sample_weight=None):  # a loss ported as TFF's Keras losses are
    del sample_weight
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  model = _linear_with(loss_fn=unweighted)
  with pytest.raises(ValueError, match='loss_fn ignores sample_weight'):
    fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  with pytest.raises(ValueError, match='loss_fn ignores sample_weight'):
    fl.algorithms.build_fed_eval(model)


def test_batch_statistics_without_the_mask_are_refused_and_with_it_accepted():
  def centred(weights, x, training=True):  # normalizes over the whole batch, padding included
    x = x - jnp.mean(x, axis=0)
    return x @ weights.trainable['w'] + weights.trainable['b']

  with pytest.raises(ValueError, match='statistics over the batch'):
    fl.algorithms.build_weighted_fed_avg(
      _linear_with(predict=centred), fl.optimizers.build_sgdm(0.1)
    )

  def masked_centred(weights, x, training=True, mask=None):
    w = jnp.ones((x.shape[0], 1)) if mask is None else mask[:, None]  # None: no padding
    x = x - jnp.sum(x * w, axis=0) / jnp.sum(w)
    return x @ weights.trainable['w'] + weights.trainable['b']

  fl.algorithms.build_weighted_fed_avg(
    _linear_with(predict=masked_centred), fl.optimizers.build_sgdm(0.1)
  )


def test_the_built_in_models_pass_the_check():
  for model in [
    fl.models.mlp_classifier(3, 3, hidden=(4,)),
    fl.models.cnn_classifier((8, 8, 1), 3),
    *batch_norm_models().values(),
    ref.dropout_linear_model(3, 3),
  ]:
    fl.models.check_padding_invariance(model)
