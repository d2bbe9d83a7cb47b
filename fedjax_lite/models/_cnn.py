"""A ready-made model: the small CNN of the federated EMNIST benchmarks."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite.models import _classifier, _conv, _model

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def cnn_classifier(
  image_shape: Sequence[int], num_classes: int, seed: int = 0
) -> _model.FunctionalModel:
  """conv 3×3×32, conv 3×3×64 (VALID, ReLU), max-pool 2×2, dense 128 (ReLU), dense classes.

  With `image_shape=(28, 28, 1)` and 62 classes this is the EMNIST CNN of Reddi et al. (2021)
  and benchmarks/WORKLOAD.md (1,206,590 parameters). Inputs `x` `[batch_size, *image_shape]` (or
  `[batch_size, prod(image_shape)]`, reshaped) float32, labels `y` `[batch_size]` int32;
  Glorot-uniform weights, zero biases; metrics: accuracy.
  """
  if len(image_shape) != 3 or min(image_shape[:2]) < 6:
    raise ValueError(
      f'image_shape must be (height, width, channels) with height, width >= 6 (two 3x3 convs '
      f'and a 2x2 pool); got {tuple(image_shape)}'
    )
  height, width, channels = image_shape
  pooled = ((height - 4) // 2) * ((width - 4) // 2) * 64
  shapes = {
    'conv1': (3, 3, channels, 32),
    'conv2': (3, 3, 32, 64),
    'dense1': (pooled, 128),
    'dense2': (128, num_classes),
  }
  keys = jax.random.split(jax.random.PRNGKey(seed), len(shapes))
  init = jax.nn.initializers.glorot_uniform()
  trainable = {
    name: {'w': init(k, shape, jnp.float32), 'b': jnp.zeros((shape[-1],), jnp.float32)}
    for k, (name, shape) in zip(keys, shapes.items(), strict=True)
  }

  def predict_on_batch(weights, x, training=True):
    del training
    p = weights.trainable
    h = jnp.reshape(x, (x.shape[0], height, width, channels))
    for name in ('conv1', 'conv2'):
      h = _conv.conv_general_dilated(
        h, p[name]['w'], (1, 1), 'VALID', dimension_numbers=_DIMENSIONS
      )
      h = jax.nn.relu(h + p[name]['b'])
    h = lax.reduce_window(h, -jnp.inf, lax.max, (1, 2, 2, 1), (1, 2, 2, 1), 'VALID')
    h = jnp.reshape(h, (h.shape[0], -1))
    h = jax.nn.relu(h @ p['dense1']['w'] + p['dense1']['b'])
    return h @ p['dense2']['w'] + p['dense2']['b']

  return _classifier.classifier(trainable, predict_on_batch, image_shape)
