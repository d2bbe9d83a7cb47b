"""FedAvg with a client learning rate scheduled over rounds, against the numpy FedAvg."""

import numpy as np
import numpy_reference as ref
import optax
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]


def _schedule(round_num):
  return 0.2 * 0.5**round_num


@pytest.mark.parametrize('momentum', [None, 0.5])
def test_each_round_trains_at_the_scheduled_learning_rate(momentum):
  process = fl.algorithms.build_weighted_fed_avg_with_optimizer_schedule(
    ref.linear_model(5, 3), _schedule, lambda lr: fl.optimizers.build_sgdm(lr, momentum)
  )
  state = process.initialize()
  t = process.get_model_weights(state).trainable
  w, b = np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)
  clients = ref.random_clients(SIZES)
  for round_num in range(3):
    batches = fl.data.build_client_batches(clients, batch_size=4, seed=round_num)
    state, metrics = process.next(state, batches)
    w, b, expected = ref.fed_avg_round(w, b, batches, _schedule(round_num), momentum)
    t = process.get_model_weights(state).trainable
    np.testing.assert_allclose(t['w'], w, atol=1e-5)
    np.testing.assert_allclose(t['b'], b, atol=1e-5)
    np.testing.assert_allclose(
      float(metrics['client_work']['train']['loss']), expected['loss'], rtol=1e-5
    )
    assert float(metrics['client_work']['client_learning_rate']) == pytest.approx(
      _schedule(round_num)
    )
  assert int(state.client_work.round_num) == 3


def test_an_optax_schedule_works_and_the_learning_rate_cannot_be_set():
  process = fl.algorithms.build_weighted_fed_avg_with_optimizer_schedule(
    ref.linear_model(5, 3),
    optax.exponential_decay(0.1, transition_steps=1, decay_rate=0.5),
    lambda lr: fl.optimizers.build_sgdm(lr, momentum=0.9),
  )
  state = process.initialize()
  assert set(process.get_hparams(state)['client_work']) == {'momentum'}
  with pytest.raises(ValueError, match=r"hparams\['learning_rate'\] is set every round"):
    process.set_hparams(state, {'client_work': {'learning_rate': 0.5}})
  state = process.set_hparams(state, {'client_work': {'momentum': 0.25}})
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4)
  state, metrics = process.next(state, batches)
  state, metrics = process.next(state, batches)
  assert float(metrics['client_work']['client_learning_rate']) == pytest.approx(0.05)
  assert float(process.get_hparams(state)['client_work']['momentum']) == 0.25


def test_an_optimizer_without_a_learning_rate_is_refused():
  with pytest.raises(TypeError, match='must return an optimizer with a learning_rate'):
    fl.algorithms.build_weighted_fed_avg_with_optimizer_schedule(
      ref.linear_model(5, 3), _schedule, lambda lr: optax.sgd(lr)
    )
