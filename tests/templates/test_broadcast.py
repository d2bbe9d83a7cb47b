"""The broadcast input of client work: a server value every client of a round reads, and a
per-client sum streamed beside the update for the server's own step, from public names only."""

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from test_client_work import _compose

import fedjax_lite as fl

SIZES = [9, 2, 14, 0, 5, 7]  # client 3 has no example: it takes no part, not even in the sum
BETA = 0.5


class DirectionState(NamedTuple):
  direction: Any
  client_work: fl.templates.ClientWorkState


def _direction_work(model, learning_rate, client_chunk_size=2, mesh=None):
  """A SCAFFOLD-like algorithm: clients step along `(1 - β) g + β d`, d the server direction
  broadcast to them; the server sets d to the clients' mean per-step direction."""

  def client_loop(weights, hparams, direction):
    x, lr = weights.trainable, hparams['learning_rate']

    def init(client_input, key):
      return x, jnp.zeros((), jnp.int32)

    def step(carry, batch, mask, key):
      w, steps = carry
      grads, step_metrics = fl.templates.masked_grad(
        model, weights._replace(trainable=w), batch, mask
      )
      w = jax.tree.map(lambda w, g, d: w - lr * ((1 - BETA) * g + BETA * d), w, grads, direction)
      return (w, steps + 1), step_metrics

    def finalize(carry):
      w, steps = carry
      delta = jax.tree.map(jnp.subtract, x, w)
      per_step = jax.tree.map(lambda d: d / (jnp.maximum(steps, 1) * lr), delta)
      return fl.templates.ClientOutput(update=delta, client_sum=(per_step, jnp.float32(1)))

    return fl.templates.ClientLoop(init, step, finalize)

  work = fl.templates.build_client_work(
    model,
    client_loop,
    {'learning_rate': jnp.float32(learning_rate)},
    client_chunk_size=client_chunk_size,
    mesh=mesh,
  )

  def initialize():
    return DirectionState(
      fl.tree.tree_zeros_like(model.initial_weights.trainable), work.initialize()
    )

  def next_fn(state, weights, client_batches, client_inputs=(), *, client_part=None):
    out = work.next(
      state.client_work,
      weights,
      client_batches,
      client_inputs,
      client_part=client_part,
      broadcast=state.direction,
    )
    total, count = out.result.client_sum
    direction = jax.tree.map(lambda t: t / jnp.maximum(count, 1.0), total)
    result = out.result._replace(client_sum=())
    return fl.templates.MeasuredProcessOutput(
      DirectionState(direction, out.state), result, {**out.measurements, 'clients': count}
    )

  return fl.templates.ClientWorkProcess(
    initialize,
    next_fn,
    lambda state: work.get_hparams(state.client_work),
    lambda state, hparams: state._replace(client_work=work.set_hparams(state.client_work, hparams)),
    streams=True,
  )


def _direction_reference(w, b, d, client_batches, lr):
  """Numpy round of `_direction_work` (server SGD 1.0 on the example-weighted mean delta)."""
  deltas, counts, directions = [], [], []
  for c in range(client_batches.mask.shape[0]):
    cw, cb, n, steps = w.copy(), b.copy(), 0, 0
    for x, y in ref.real_batches(client_batches, c):
      _, gw, gb, _ = ref.loss_and_grads(cw, cb, x, y)
      cw = cw - lr * ((1 - BETA) * gw + BETA * d[0])
      cb = cb - lr * ((1 - BETA) * gb + BETA * d[1])
      n, steps = n + len(y), steps + 1
    if n:
      deltas.append((w - cw, b - cb))
      counts.append(n)
      directions.append(((w - cw) / (steps * lr), (b - cb) / (steps * lr)))
  total = sum(counts)
  dw = sum(n * dl[0] for n, dl in zip(counts, deltas, strict=True)) / total
  db = sum(n * dl[1] for n, dl in zip(counts, deltas, strict=True)) / total
  d = tuple(sum(dr[i] for dr in directions) / len(directions) for i in (0, 1))
  return w - dw, b - db, d, len(directions)


class _StackedMeanFactory:
  """The weighted mean as a stacked aggregation (`next` only): the updates come `[clients, ...]`."""

  def create(self, spec):
    mean = fl.aggregators.MeanFactory().create(spec)
    return fl.templates.AggregationProcess(mean.initialize, mean.next, True)


@pytest.mark.parametrize('stacked', [False, True], ids=['streamed', 'stacked'])
def test_a_broadcast_server_value_from_the_public_api_matches_numpy(stacked):
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4)
  aggregator = _StackedMeanFactory() if stacked else None
  process = _compose(model, _direction_work(model, 0.1), aggregator)
  state = process.initialize()
  w, b = (np.asarray(model.initial_weights.trainable[k], np.float64) for k in ('w', 'b'))
  d = (np.zeros_like(w), np.zeros_like(b))
  for _ in range(3):
    state, metrics = process.next(state, batches)
    w, b, d, clients = _direction_reference(w, b, d, batches, 0.1)
    assert metrics['client_work']['clients'] == clients == 5
    got = process.get_model_weights(state).trainable
    np.testing.assert_allclose(got['w'], w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got['b'], b, rtol=1e-5, atol=1e-6)
    direction = state.client_work.direction
    np.testing.assert_allclose(direction['w'], d[0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(direction['b'], d[1], rtol=1e-5, atol=1e-6)
  # The hyperparameters hold only what a user tunes: the direction is state, not an hparam.
  assert process.get_hparams(state)['client_work'] == {'learning_rate': np.float32(0.1)}


def test_the_client_sum_is_the_same_in_any_chunk_and_across_devices():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([*SIZES, 3, 4]), batch_size=4)
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('clients',))
  directions = []
  for kwargs in ({'client_chunk_size': 1}, {'client_chunk_size': 3}, {'mesh': mesh}):
    work = _direction_work(model, 0.1, **kwargs)
    out = work.next(work.initialize(), model.initial_weights, batches)
    assert out.measurements['clients'] == 7
    directions.append(out.state.direction)
  for direction in directions[1:]:
    for key in ('w', 'b'):
      np.testing.assert_allclose(direction[key], directions[0][key], rtol=1e-5, atol=1e-7)


def test_a_loop_without_a_broadcast_parameter_refuses_a_broadcast():
  model = ref.linear_model(5, 3)
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
  batches = fl.data.build_client_batches(ref.random_clients([3, 4]), batch_size=4)
  with pytest.raises(TypeError, match=r'takes \(model_weights, hparams\).*third parameter'):
    work.next(work.initialize(), model.initial_weights, batches, broadcast=jnp.ones(3))
