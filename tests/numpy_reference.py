"""Plain numpy references the tests compare the compiled rounds against.

The model is linear softmax regression `logits = x @ w + b`, whose gradient is written out by
hand here, so no number in a golden value comes from the code under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lite as fl


def linear_model(num_features: int, num_classes: int, seed: int = 0) -> fl.FunctionalModel:
  rng = np.random.default_rng(seed)
  trainable = {
    'w': (0.1 * rng.standard_normal((num_features, num_classes))).astype(np.float32),
    'b': (0.1 * rng.standard_normal(num_classes)).astype(np.float32),
  }

  def predict(weights, x, training=True):
    del training
    return x @ weights.trainable['w'] + weights.trainable['b']

  return fl.FunctionalModel(
    initial_weights=fl.ModelWeights(trainable, ()),
    predict_on_batch_fn=predict,
    loss_fn=fl.models.softmax_cross_entropy,
    metrics_fns=fl.metrics.create_functional_metric_fns(
      {'accuracy': fl.metrics.sparse_categorical_accuracy()}
    ),
    input_spec={
      'x': jax.ShapeDtypeStruct((None, num_features), jnp.float32),
      'y': jax.ShapeDtypeStruct((None,), jnp.int32),
    },
  )


def dropout_linear_model(num_features: int, num_classes: int, seed: int = 0) -> fl.FunctionalModel:
  """`linear_model` with half its inputs dropped while training, by the `rng` it is given."""
  base = linear_model(num_features, num_classes, seed)

  def predict(weights, x, training=True, rng=None):
    keep = jax.random.bernoulli(rng, 0.5, x.shape) if training else 1.0
    return (x * keep) @ weights.trainable['w'] + weights.trainable['b']

  return fl.FunctionalModel(
    initial_weights=base.initial_weights,
    predict_on_batch_fn=predict,
    loss_fn=fl.models.softmax_cross_entropy,
    input_spec=base.input_spec,
  )


def random_clients(sizes, num_features=5, num_classes=3, seed=0):
  rng = np.random.default_rng(seed)
  return [
    {
      'x': rng.standard_normal((n, num_features)).astype(np.float32),
      'y': rng.integers(0, num_classes, n).astype(np.int32),
    }
    for n in sizes
  ]


def softmax(z):
  z = z - z.max(axis=1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(axis=1, keepdims=True)


def loss_and_grads(w, b, x, y):
  """Mean cross-entropy of one (unpadded) batch and its gradients."""
  n = len(y)
  p = softmax(x.astype(np.float64) @ w + b)
  loss = -np.mean(np.log(p[np.arange(n), y]))
  g = p.copy()
  g[np.arange(n), y] -= 1.0
  g /= n
  return loss, x.T @ g, g.sum(axis=0), (p.argmax(axis=1) == y).sum()


def real_batches(client_batches, client):
  """The unpadded batches of one client, in step order."""
  mask = np.asarray(client_batches.mask[client])
  x = np.asarray(client_batches.batch['x'][client])
  y = np.asarray(client_batches.batch['y'][client])
  for step in range(mask.shape[0]):
    keep = mask[step] > 0
    if keep.any():
      yield x[step][keep], y[step][keep]


def fed_avg_round(
  w, b, client_batches, lr, momentum=None, weighting='num_examples', proximal_strength=0.0
):
  """One round of FedAvg with server SGD 1.0; returns new (w, b) and the train metrics.

  With `proximal_strength` μ it is FedProx (Li et al., 2020): each local gradient gets
  `μ·(w_client − w)`, the gradient of `μ/2·‖w_client − w‖²`."""
  num_clients = np.asarray(client_batches.mask).shape[0]
  deltas, weights = [], []
  loss_sum = correct = examples = 0.0
  for c in range(num_clients):
    cw, cb = w.copy(), b.copy()
    vw, vb = np.zeros_like(w), np.zeros_like(b)
    n_client = 0
    for x, y in real_batches(client_batches, c):
      loss, gw, gb, right = loss_and_grads(cw, cb, x, y)
      gw, gb = gw + proximal_strength * (cw - w), gb + proximal_strength * (cb - b)
      loss_sum += loss * len(y)
      correct += right
      n_client += len(y)
      if momentum is None:
        cw, cb = cw - lr * gw, cb - lr * gb
      else:
        vw, vb = momentum * vw + gw, momentum * vb + gb
        cw, cb = cw - lr * vw, cb - lr * vb
    examples += n_client
    deltas.append((w - cw, b - cb))
    if callable(weighting):
      weights.append(weighting(n_client))
    else:
      weights.append(n_client if weighting == 'num_examples' else float(n_client > 0))
  total = sum(weights)
  mean_dw = sum(wt * d[0] for wt, d in zip(weights, deltas, strict=True)) / total
  mean_db = sum(wt * d[1] for wt, d in zip(weights, deltas, strict=True)) / total
  metrics = {'loss': loss_sum / examples, 'accuracy': correct / examples, 'num_examples': examples}
  return w - mean_dw, b - mean_db, metrics


def tff_optimizer_update(name, h, g, state=None):
  """One step of TFF's rule (tensorflow_federated/python/learning/optimizers/<name>.py) on one
  array, in float64. `h` holds the builder's keyword arguments; `state` is None at the first
  step. Returns `(update, state)`, the update to add to the weights."""
  g = np.asarray(g, np.float64)
  if state is None:
    v0 = {'adagrad': 0.1, 'yogi': 1e-6}.get(name, 0.0)
    v0 = h.get('initial_accumulator_value', v0)
    state = {'t': 0, 'm': np.zeros_like(g), 'v': np.full_like(g, v0)}
  t, m, v = state['t'] + 1, state['m'], state['v']
  lr = h['learning_rate']
  if name in ('sgd', 'sgdm'):
    m = h.get('momentum', 0.0) * m + g
    update = -lr * m
  elif name in ('adam', 'yogi'):
    m = h['b1'] * m + (1 - h['b1']) * g
    if name == 'adam':
      v = h['b2'] * v + (1 - h['b2']) * g**2
    else:
      v = v + (1 - h['b2']) * np.sign(g**2 - v) * g**2
    step = lr * np.sqrt(1 - h['b2'] ** t) / (1 - h['b1'] ** t)
    update = -step * m / (np.sqrt(v) + h['eps'])
  elif name == 'adagrad':
    v = v + g**2
    update = -lr * g / np.sqrt(v + h['eps'])
  elif name == 'rmsprop':
    v = h['decay'] * v + (1 - h['decay']) * g**2
    update = -lr * g / (np.sqrt(v) + h['eps'])
  else:
    raise ValueError(name)
  return update, {'t': t, 'm': m, 'v': v}
