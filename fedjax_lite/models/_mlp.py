"""A ready-made model: the multilayer perceptron classifier of the FL literature."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedjax_lite.models import _classifier, _model


def mlp_classifier(
  num_features: int, num_classes: int, hidden: Sequence[int] = (64,), seed: int = 0
) -> _model.FunctionalModel:
  """A ReLU MLP classifier as a `FunctionalModel`, e.g. McMahan et al.'s 2NN (784-200-200-10).

  Inputs `x` `[batch_size, num_features]` (or any shape flattening to it) float32, labels `y`
  `[batch_size]` int32; Glorot-uniform weights, zero biases; metrics: accuracy.
  """
  sizes = [num_features, *hidden, num_classes]
  keys = jax.random.split(jax.random.PRNGKey(seed), len(sizes) - 1)
  init = jax.nn.initializers.glorot_uniform()
  trainable = [
    {'w': init(k, (a, b), jnp.float32), 'b': jnp.zeros((b,), jnp.float32)}
    for k, a, b in zip(keys, sizes[:-1], sizes[1:], strict=True)
  ]

  def predict_on_batch(weights, x, training=True):
    del training
    h = jnp.reshape(x, (x.shape[0], -1))
    for i, layer in enumerate(weights.trainable):
      h = h @ layer['w'] + layer['b']
      if i < len(weights.trainable) - 1:
        h = jax.nn.relu(h)
    return h

  return _classifier.classifier(trainable, predict_on_batch, (num_features,))
