"""TFF's ResNet v2 with group normalization (`tff.simulation.models.resnet_models`) in flax.

As `create_resnet18(input_shape, num_classes)` builds it (norm_layer=GROUP_NORM): a 7x7/2 conv
of 64 filters, GN, ReLU, a 3x3/2 max-pool, four stages of two basic blocks (64, 128, 256, 512
filters; every block has stride 1 in TFF's code, so a 24x24 input stays 6x6 after the stem),
GN, ReLU, global average pooling, a dense layer over the classes. GN: epsilon 1e-3, a scale and
an offset per channel, `num_groups` groups: 32 by default (Keras's `GroupNormalization`, which
TFF's ResNet uses since 2023), 2 as Reddi et al. 2021 trained (tfa's `GroupNormalization`
default, which TFF's own group_norm.py kept until then; `fl.tasks.cifar100` uses 2).
Convolutions have no bias and He-normal kernels; the classifier's kernel is normal(0.01). GN has
no batch statistics, so padded examples change nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedjax_lite.models import _conv

# resnet_models.py's constant: Keras's l2(1e-4) on every conv kernel and the classifier.
RESNET_L2_WEIGHT_DECAY = 1e-4


class ResNetGN(nn.Module):
  """ResNet v2 (pre-activation, basic blocks) with group normalization, input `[batch, h, w, c]`
  float32, output `[batch, num_classes]` logits (TFF's model ends in a softmax; the loss here
  takes logits).

  Attributes:
    num_classes: outputs.
    stage_sizes: basic blocks per stage; (2, 2, 2, 2) is ResNet-18.
    initial_filters: filters of the stem and the first stage (doubled each stage).
    num_groups: GN groups, dividing every width (Keras's default 32; Reddi et al. 2021 and TFF
      before 2023: 2).
  """

  num_classes: int
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  initial_filters: int = 64
  num_groups: int = 32

  def _conv(self, x, filters, kernel, strides=(1, 1), padding='SAME'):
    return nn.Conv(
      filters,
      kernel,
      strides,
      padding=padding,
      use_bias=False,
      kernel_init=nn.initializers.he_normal(),
      conv_general_dilated=_conv.conv_general_dilated,
    )(x)

  def _norm(self, x):
    return nn.GroupNorm(num_groups=self.num_groups, epsilon=1e-3)(x)

  @nn.compact
  def __call__(self, x):
    x = nn.relu(self._norm(self._conv(x, self.initial_filters, (7, 7), (2, 2))))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    filters = self.initial_filters
    for stage, blocks in enumerate(self.stage_sizes):
      for block in range(blocks):
        y = x if stage == 0 and block == 0 else nn.relu(self._norm(x))
        y = self._conv(y, filters, (3, 3))
        y = self._conv(nn.relu(self._norm(y)), filters, (3, 3))
        shortcut = x
        if x.shape[-1] != filters:
          shortcut = self._norm(self._conv(x, filters, (1, 1), padding='VALID'))
        x = shortcut + y
      filters *= 2
    x = nn.relu(self._norm(x))
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.normal(0.01))(x)


def l2_regularization(params, weight: float = RESNET_L2_WEIGHT_DECAY) -> jax.Array:
  """`[]` `weight` times the sum of squares of every conv kernel and the dense layer's kernel and
  bias (the leaves Keras regularizes in TFF's ResNet; GN's scale and offset are not)."""
  total = jnp.zeros((), jnp.float32)
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    names = [getattr(p, 'key', '') for p in path]
    if any(str(n).startswith(('Conv', 'Dense')) for n in names):
      total = total + jnp.sum(jnp.square(leaf.astype(jnp.float32)))
  return weight * total
