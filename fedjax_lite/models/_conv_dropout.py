"""TFF's EMNIST CNN with dropout (`emnist_models.create_conv_dropout_model`) in flax."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from fedjax_lite.models import _conv


class ConvDropoutCNN(nn.Module):
  """conv 3x3x32 ReLU, conv 3x3x64 ReLU (VALID), max-pool 2, dropout 0.25, flatten, dense 128
  ReLU, dropout 0.5, dense `num_classes` (logits; TFF's ends in a softmax).

  Input `[batch, 28, 28, 1]` float32; Glorot-uniform kernels and zero biases (Keras's
  defaults). With 62 classes: 1,206,590 parameters; with 10: 1,199,882 (TFF's summary).
  Dropout draws from the 'dropout' rng stream when `train`.
  """

  num_classes: int = 62

  @nn.compact
  def __call__(self, x, train: bool = False):
    init = nn.initializers.glorot_uniform()
    for features in (32, 64):
      x = nn.Conv(
        features,
        (3, 3),
        padding='VALID',
        kernel_init=init,
        conv_general_dilated=_conv.conv_general_dilated,
      )(x)
      x = nn.relu(x)
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = nn.Dropout(0.25, deterministic=not train)(x)
    x = jnp.reshape(x, (x.shape[0], -1))
    x = nn.relu(nn.Dense(128, kernel_init=init)(x))
    x = nn.Dropout(0.5, deterministic=not train)(x)
    return nn.Dense(self.num_classes, kernel_init=init)(x)
