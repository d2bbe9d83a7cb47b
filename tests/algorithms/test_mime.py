"""MimeLite and Mime against a numpy loop over clients with TFF's optimizer rules."""

import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]


def _full_gradient(w, b, client_batches, client):
  """The client's mean gradient over all its real examples, at (w, b)."""
  sum_w, sum_b, n = 0.0, 0.0, 0
  for x, y in ref.real_batches(client_batches, client):
    _, gw, gb, _ = ref.loss_and_grads(w, b, x, y)
    sum_w, sum_b, n = sum_w + len(y) * gw, sum_b + len(y) * gb, n + len(y)
  return sum_w / n, sum_b / n, n


def mime_round(w, b, client_batches, name, h, opt, control_variate, weighting):
  """One round of Mime (`control_variate`) or MimeLite with server SGD 1.0.

  `opt` is `{'w': state, 'b': state}` of `ref.tff_optimizer_update` (None entries at first).
  Returns new `(w, b, opt, mean training loss)`."""
  num_clients = np.asarray(client_batches.mask).shape[0]
  full = [_full_gradient(w, b, client_batches, c) for c in range(num_clients)]
  weights = [n if weighting == 'num_examples' else 1.0 for _, _, n in full]
  total = sum(weights)
  cw_mean = sum(wt * f[0] for wt, f in zip(weights, full, strict=True)) / total
  cb_mean = sum(wt * f[1] for wt, f in zip(weights, full, strict=True)) / total
  delta_w = delta_b = 0.0
  loss_sum = examples = 0.0
  for c in range(num_clients):
    cw, cb = w.copy(), b.copy()
    for x, y in ref.real_batches(client_batches, c):
      loss, gw, gb, _ = ref.loss_and_grads(cw, cb, x, y)
      loss_sum, examples = loss_sum + loss * len(y), examples + len(y)
      if control_variate:
        _, gw0, gb0, _ = ref.loss_and_grads(w, b, x, y)
        gw, gb = gw - gw0 + cw_mean, gb - gb0 + cb_mean
      cw = cw + ref.tff_optimizer_update(name, h, gw, opt['w'])[0]  # the state stays frozen
      cb = cb + ref.tff_optimizer_update(name, h, gb, opt['b'])[0]
    delta_w, delta_b = delta_w + weights[c] * (w - cw), delta_b + weights[c] * (b - cb)
  opt = {
    'w': ref.tff_optimizer_update(name, h, cw_mean, opt['w'])[1],
    'b': ref.tff_optimizer_update(name, h, cb_mean, opt['b'])[1],
  }
  return w - delta_w / total, b - delta_b / total, opt, loss_sum / examples


@pytest.mark.parametrize(
  ('builder', 'control_variate', 'weighting', 'name', 'h'),
  [
    (
      fl.algorithms.build_weighted_mime_lite,
      False,
      'num_examples',
      'sgdm',
      dict(learning_rate=0.1, momentum=0.9),
    ),
    (
      fl.algorithms.build_unweighted_mime_lite,
      False,
      'uniform',
      'adam',
      dict(learning_rate=0.02, b1=0.9, b2=0.99, eps=1e-3),
    ),
    (fl.algorithms.build_mime, True, 'num_examples', 'sgdm', dict(learning_rate=0.1, momentum=0.9)),
  ],
  ids=['weighted_mime_lite', 'unweighted_mime_lite_adam', 'mime'],
)
def test_mime_equals_numpy_loop(builder, control_variate, weighting, name, h):
  base = (fl.optimizers.build_sgdm if name == 'sgdm' else fl.optimizers.build_adam)(**h)
  process = builder(ref.linear_model(5, 3), base, client_chunk_size=3)
  state = process.initialize()
  t = process.get_model_weights(state).trainable
  w, b = np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)
  opt = {'w': None, 'b': None}
  clients = ref.random_clients(SIZES)
  for round_num in range(3):
    batches = fl.data.build_client_batches(clients, batch_size=4, num_epochs=2, seed=round_num)
    state, metrics = process.next(state, batches)
    w, b, opt, loss = mime_round(w, b, batches, name, h, opt, control_variate, weighting)
    t = process.get_model_weights(state).trainable
    np.testing.assert_allclose(t['w'], w, atol=1e-5)
    np.testing.assert_allclose(t['b'], b, atol=1e-5)
    np.testing.assert_allclose(float(metrics['client_work']['train']['loss']), loss, rtol=1e-5)
    assert int(metrics['client_work']['train']['num_examples']) == 2 * sum(SIZES)


def test_base_optimizer_hyperparameters_are_the_client_work_hparams():
  process = fl.algorithms.build_weighted_mime_lite(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1, momentum=0.9)
  )
  state = process.initialize()
  assert set(process.get_hparams(state)['client_work']) == {'learning_rate', 'momentum'}
  state = process.set_hparams(state, {'client_work': {'learning_rate': 0.0}})
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4)
  new_state, _ = process.next(state, batches)
  np.testing.assert_array_equal(  # learning rate 0: the clients do not move the model
    process.get_model_weights(new_state).trainable['w'],
    process.get_model_weights(state).trainable['w'],
  )
