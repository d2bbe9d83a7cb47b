"""A recurrent model (flax LSTM cells scanned over time) inside the vmapped, chunked client loop
equals a plain Python loop over clients and batches of the same steps."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import fedjax_lite as fl

VOCAB, SEQUENCE = 12, 6


class TinyLSTM(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Embed(VOCAB, 4)(x)
    h = nn.RNN(nn.OptimizedLSTMCell(8))(h)
    return nn.Dense(VOCAB)(h)


def token_loss(logits, labels, sample_weight=None):
  per_sequence = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(axis=1)
  return fl.models.weighted_mean(per_sequence, sample_weight)


def _model():
  spec = {
    'x': jax.ShapeDtypeStruct((None, SEQUENCE), jnp.int32),
    'y': jax.ShapeDtypeStruct((None, SEQUENCE), jnp.int32),
  }
  return fl.models.from_flax(TinyLSTM(), input_spec=spec, loss_fn=token_loss)


def _batches(round_num, sizes=(5, 3, 8, 2)):
  rng = np.random.default_rng(round_num)
  clients = []
  for n in sizes:
    stream = rng.integers(0, VOCAB, (n, SEQUENCE + 1), dtype=np.int32)
    clients.append({'x': stream[:, :-1], 'y': stream[:, 1:]})
  return fl.data.build_client_batches(clients, batch_size=2, seed=round_num)


def _loop_round(model, trainable, batches, lr):
  """FedAvg by hand: each client SGD over its real examples batch by batch, example-weighted."""

  @jax.jit
  def step(w, x, y):
    def loss(w):
      return token_loss(model.predict_on_batch(fl.ModelWeights(w, {}), x, True), y)

    return jax.tree.map(lambda p, g: p - lr * g, w, jax.grad(loss)(w))

  mask = np.asarray(batches.mask)
  total, acc = 0.0, jax.tree.map(jnp.zeros_like, trainable)
  for c in range(mask.shape[0]):
    local = trainable
    for s in range(mask.shape[1]):
      real = mask[c, s] > 0
      if real.any():
        local = step(local, batches.batch['x'][c, s][real], batches.batch['y'][c, s][real])
    n = float(mask[c].sum())
    acc, total = jax.tree.map(lambda a, w, n=n: a + n * w, acc, local), total + n
  return jax.tree.map(lambda a: a / total, acc)


@pytest.mark.parametrize('chunk', [1, 3])
def test_an_lstm_round_equals_a_python_loop_over_clients_and_batches(chunk):
  model = _model()
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.5), fl.optimizers.build_sgdm(1.0), client_chunk_size=chunk
  )
  state = process.initialize()
  expected = model.initial_weights.trainable
  for round_num in range(2):
    batches = _batches(round_num)
    state, metrics = process.next(state, batches)
    expected = _loop_round(model, expected, batches, 0.5)
    assert int(metrics['client_work']['train']['num_examples']) == 18
  got = process.get_model_weights(state).trainable
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_a_recurrent_model_runs_one_client_per_lane_on_a_cpu():
  from fedjax_lite.templates import _client_work

  assert _client_work._one_client_per_lane_on_cpu(_model())  # its LSTM scans over time
