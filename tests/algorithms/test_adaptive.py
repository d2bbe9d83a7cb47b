"""FedAdam, FedYogi and FedAdagrad: TFF's rule applied to the averaged delta, in numpy."""

import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]


@pytest.mark.parametrize(
  ('builder', 'name', 'server'),
  [
    (fl.algorithms.build_fed_adam, 'adam', dict(b1=0.9, b2=0.99, eps=1e-3)),
    (fl.algorithms.build_fed_yogi, 'yogi', dict(b1=0.9, b2=0.99, eps=1e-3)),
    (fl.algorithms.build_fed_adagrad, 'adagrad', dict(initial_accumulator_value=1e-6, eps=1e-7)),
  ],
)
def test_server_optimizer_applies_tff_rule_to_the_averaged_delta(builder, name, server):
  server_lr, client_lr = 0.05, 0.1
  process = builder(ref.linear_model(5, 3), fl.optimizers.build_sgdm(client_lr), server_lr)
  state = process.initialize()
  t = process.get_model_weights(state).trainable
  w, b = np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)
  h = {'learning_rate': server_lr, **server}
  opt_w = opt_b = None
  clients = ref.random_clients(SIZES)
  for round_num in range(3):
    batches = fl.data.build_client_batches(clients, batch_size=4, seed=round_num)
    state, metrics = process.next(state, batches)
    avg_w, avg_b, expected = ref.fed_avg_round(w, b, batches, client_lr)
    update_w, opt_w = ref.tff_optimizer_update(name, h, w - avg_w, opt_w)
    update_b, opt_b = ref.tff_optimizer_update(name, h, b - avg_b, opt_b)
    w, b = w + update_w, b + update_b
    t = process.get_model_weights(state).trainable
    np.testing.assert_allclose(t['w'], w, atol=1e-5)
    np.testing.assert_allclose(t['b'], b, atol=1e-5)
    np.testing.assert_allclose(
      float(metrics['client_work']['train']['loss']), expected['loss'], rtol=1e-5
    )
  assert float(process.get_hparams(state)['finalizer']['learning_rate']) == pytest.approx(server_lr)
