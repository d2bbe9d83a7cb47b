"""`cnn_classifier` against a numpy convolution, and its EMNIST parameter count."""

import jax
import numpy as np
import pytest

import fedjax_lite as fl


def _numpy_forward(p, x):
  def conv(h, w, b):  # VALID, stride 1, NHWC x HWIO
    kh, kw = w.shape[:2]
    out = np.zeros((h.shape[0], h.shape[1] - kh + 1, h.shape[2] - kw + 1, w.shape[3]))
    for i in range(out.shape[1]):
      for j in range(out.shape[2]):
        out[:, i, j] = np.einsum('nabc,abcd->nd', h[:, i : i + kh, j : j + kw], w)
    return np.maximum(out + b, 0)

  h = conv(x, p['conv1']['w'], p['conv1']['b'])
  h = conv(h, p['conv2']['w'], p['conv2']['b'])
  n, hh, ww, c = h.shape
  h = h[:, : hh // 2 * 2, : ww // 2 * 2].reshape(n, hh // 2, 2, ww // 2, 2, c).max(axis=(2, 4))
  h = np.maximum(h.reshape(n, -1) @ p['dense1']['w'] + p['dense1']['b'], 0)
  return h @ p['dense2']['w'] + p['dense2']['b']


def test_forward_equals_numpy():
  model = fl.models.cnn_classifier((9, 8, 2), 5, seed=1)
  x = np.random.default_rng(0).random((3, 9, 8, 2)).astype(np.float32)
  p = jax.tree.map(np.asarray, model.initial_weights.trainable)
  got = model.predict_on_batch(model.initial_weights, x, training=False)
  np.testing.assert_allclose(got, _numpy_forward(p, x.astype(np.float64)), rtol=1e-4, atol=1e-5)
  flat = model.predict_on_batch(model.initial_weights, x.reshape(3, -1), training=False)
  np.testing.assert_allclose(flat, got, rtol=1e-6)


def test_emnist_size_and_bad_shape():
  model = fl.models.cnn_classifier((28, 28, 1), 62)
  count = sum(a.size for a in jax.tree.leaves(model.initial_weights.trainable))
  assert count == 1_206_590
  with pytest.raises(ValueError, match=r'height, width >= 6 .* got \(5, 8, 1\)'):
    fl.models.cnn_classifier((5, 8, 1), 10)
