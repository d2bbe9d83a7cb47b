"""FedProx against a numpy loop over clients; strength 0 is FedAvg."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]


def _weights(state, process):
  t = process.get_model_weights(state).trainable
  return np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)


def _batches(round_num):
  clients = ref.random_clients(SIZES)
  return fl.data.build_client_batches(clients, batch_size=4, num_epochs=2, seed=round_num)


@pytest.mark.parametrize(
  ('builder', 'weighting', 'chunk'),
  [
    (fl.algorithms.build_weighted_fed_prox, 'num_examples', None),
    (fl.algorithms.build_unweighted_fed_prox, 'uniform', 3),
  ],
)
def test_fed_prox_equals_numpy_loop(builder, weighting, chunk):
  mu, lr = 0.5, 0.2
  process = builder(
    ref.linear_model(5, 3), mu, fl.optimizers.build_sgdm(lr), client_chunk_size=chunk
  )
  state = process.initialize()
  w, b = _weights(state, process)
  for round_num in range(3):
    batches = _batches(round_num)
    state, metrics = process.next(state, batches)
    w, b, expected = ref.fed_avg_round(w, b, batches, lr, None, weighting, proximal_strength=mu)
    got_w, got_b = _weights(state, process)
    np.testing.assert_allclose(got_w, w, atol=1e-5)
    np.testing.assert_allclose(got_b, b, atol=1e-5)
    train = metrics['client_work']['train']
    assert int(train['num_examples']) == expected['num_examples']
    np.testing.assert_allclose(float(train['loss']), expected['loss'], rtol=1e-5)


def test_the_proximal_term_pulls_clients_towards_the_server_model():
  """The paper's sign: a larger strength gives a smaller update (TFF 0.87's sign gives larger)."""
  model = ref.linear_model(5, 3)
  norms = []
  for mu in (0.0, 1.0):
    process = fl.algorithms.build_weighted_fed_prox(model, mu, fl.optimizers.build_sgdm(0.2))
    state, _ = process.next(process.initialize(), _batches(0))
    w, _ = _weights(state, process)
    w0 = np.asarray(model.initial_weights.trainable['w'])
    norms.append(np.linalg.norm(w - w0))
  assert norms[1] < 0.9 * norms[0]


def test_strength_zero_is_fed_avg_exactly():
  model = ref.linear_model(5, 3)
  opt = fl.optimizers.build_sgdm(0.1, momentum=0.9)
  prox = fl.algorithms.build_weighted_fed_prox(model, 0.0, opt)
  avg = fl.algorithms.build_weighted_fed_avg(model, opt)
  s_prox, s_avg = prox.initialize(), avg.initialize()
  for round_num in range(2):
    s_prox, m_prox = prox.next(s_prox, _batches(round_num))
    s_avg, m_avg = avg.next(s_avg, _batches(round_num))
  for a, b in zip(
    jax.tree.leaves(s_prox.global_model_weights),
    jax.tree.leaves(s_avg.global_model_weights),
    strict=True,
  ):
    np.testing.assert_array_equal(a, b)
  assert m_prox['client_work']['train'] == m_avg['client_work']['train']


def test_proximal_strength_is_a_hyperparameter_in_state():
  model = ref.linear_model(5, 3)
  process = fl.algorithms.build_weighted_fed_prox(model, 0.0, fl.optimizers.build_sgdm(0.2))
  state = process.initialize()
  hparams = process.get_hparams(state)['client_work']
  assert set(hparams) == {'learning_rate', 'proximal_strength'}
  assert float(hparams['proximal_strength']) == 0.0
  # Set between rounds (no rebuild): the round follows the numpy FedProx of the new strength.
  state = process.set_hparams(state, {'client_work': {'proximal_strength': 2.0}})
  w, b = _weights(state, process)
  batches = _batches(0)
  state, _ = process.next(state, batches)
  w, b, _ = ref.fed_avg_round(w, b, batches, 0.2, proximal_strength=2.0)
  np.testing.assert_allclose(_weights(state, process)[0], w, atol=1e-5)
  with pytest.raises(ValueError, match=r"hparams\['proximal_strength'\] must be a finite number"):
    process.set_hparams(state, {'client_work': {'proximal_strength': -1.0}})


@pytest.mark.parametrize('strength', [-0.1, float('nan'), float('inf'), '0.1', None])
def test_bad_strength_is_refused(strength):
  with pytest.raises(ValueError, match='proximal_strength must be a finite number >= 0'):
    fl.algorithms.build_weighted_fed_prox(
      ref.linear_model(5, 3), strength, fl.optimizers.build_sgdm(0.1)
    )
