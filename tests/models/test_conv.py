"""`fl.models.conv_general_dilated`: lax's values and gradients, canonical convolutions in loops."""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import fedjax_lite as fl

DIMS = ('NHWC', 'HWIO', 'NHWC')


def _inputs(in_channels=3, out_channels=5, size=9, kernel=3, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((4, size, size + 2, in_channels)).astype(np.float32)
  k = rng.standard_normal((kernel, kernel, in_channels, out_channels)).astype(np.float32)
  return jnp.asarray(x), jnp.asarray(k)


@pytest.mark.parametrize(
  ('padding', 'strides'),
  [('VALID', (1, 1)), ('SAME', (1, 1)), (((2, 0), (1, 3)), (1, 1)), ('SAME', (2, 2))],
)
def test_values_and_gradients_equal_lax(padding, strides):
  x, k = _inputs()

  def loss(conv, x, k):
    out = conv(x, k, strides, padding, dimension_numbers=DIMS)
    return jnp.sum(jnp.sin(out) * jnp.arange(out.size).reshape(out.shape) / out.size)

  want = jax.value_and_grad(loss, (1, 2))(lax.conv_general_dilated, x, k)
  got = jax.value_and_grad(loss, (1, 2))(fl.models.conv_general_dilated, x, k)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-5)


def test_other_layouts_fall_back_to_lax():
  x, k = _inputs()
  x_nchw = jnp.transpose(x, (0, 3, 1, 2))
  dims = ('NCHW', 'HWIO', 'NCHW')
  got = fl.models.conv_general_dilated(x_nchw, k, (1, 1), 'VALID', dimension_numbers=dims)
  want = lax.conv_general_dilated(x_nchw, k, (1, 1), 'VALID', dimension_numbers=dims)
  np.testing.assert_array_equal(got, want)


def test_flax_conv_takes_it_and_trains_the_same():
  x, _ = _inputs()
  plain = nn.Conv(4, (3, 3))
  fast = nn.Conv(4, (3, 3), conv_general_dilated=fl.models.conv_general_dilated)
  params = plain.init(jax.random.PRNGKey(0), x)
  grad = lambda m: jax.grad(lambda p: jnp.sum(m.apply(p, x) ** 2))(params)
  for a, b in zip(jax.tree.leaves(grad(fast)), jax.tree.leaves(grad(plain)), strict=True):
    np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-4)


def _loop_conv_dim_labels(conv):
  """The dim_labels of every convolution XLA:CPU compiles into a loop of gradient steps."""
  x, k = _inputs(size=12)

  def step(i, k):
    g = jax.grad(lambda k: jnp.sum(conv(x, k, (1, 1), 'VALID', dimension_numbers=DIMS) ** 2))(k)
    return k - 1e-3 * g

  loop = jax.jit(lambda k, n: lax.fori_loop(0, n, step, k))
  hlo = loop.lower(k, 3).compile().as_text()
  return set(re.findall(r'convolution\(.*dim_labels=([\w>-]+)', hlo))


def test_the_gradient_compiles_to_canonical_convolutions_inside_a_loop():
  """XLA:CPU runs `b01f_01io->b01f` convolutions fast; lax's own gradient leaves others in a
  loop body (the cause of CNN rounds ~20x slower than a Python loop)."""
  assert _loop_conv_dim_labels(fl.models.conv_general_dilated) == {'b01f_01io->b01f'}
  assert _loop_conv_dim_labels(lax.conv_general_dilated) != {'b01f_01io->b01f'}


def test_convolutional_models_are_recognized_for_the_cpu_chunk_default():
  from fedjax_lite.templates import _client_work

  assert _client_work._one_client_per_lane_on_cpu(fl.models.cnn_classifier((8, 8, 1), 3))
  assert not _client_work._one_client_per_lane_on_cpu(fl.models.mlp_classifier(4, 3))
