"""SCAFFOLD against a numpy loop over clients, its control variates carried in a client store."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = {'a': 7, 'b': 20, 'c': 33, 'd': 1, 'e': 0}
# 'c' comes every round, 'a' comes back after a round away, 'e' has no example.
COHORTS = [['a', 'b', 'c'], ['c', 'd', 'e'], ['a', 'c', 'e']]
POPULATION = 10


def _batches(cohort, round_num):
  data = dict(zip(SIZES, ref.random_clients(list(SIZES.values())), strict=True))
  return fl.data.build_client_batches(
    [data[i] for i in cohort],
    batch_size=4,
    num_epochs=2,
    seed=round_num,
    client_keys=[fl.data.client_key(i) for i in cohort],
  )


def scaffold_round(x, c, controls, client_batches, cohort, lr, server_lr, weighting):
  """One SCAFFOLD round (option II) in float64; `x`, `c` and each control are `(w, b)`.

  Returns the new x, c, the cohort's new controls (a client with no batch keeps its own) and
  the train metrics."""
  deltas, weights, new_controls = [], [], []
  loss_sum = examples = 0.0
  for pos, client in enumerate(cohort):
    ci = controls.get(client, (np.zeros_like(x[0]), np.zeros_like(x[1])))
    y, steps, n = (x[0].copy(), x[1].copy()), 0, 0
    for bx, by in ref.real_batches(client_batches, pos):
      loss, gw, gb, _ = ref.loss_and_grads(y[0], y[1], bx, by)
      y = tuple(v - lr * (g - i + s) for v, g, i, s in zip(y, (gw, gb), ci, c, strict=True))
      steps, n, loss_sum = steps + 1, n + len(by), loss_sum + loss * len(by)
    examples += n
    if steps:
      ci = tuple(i - s + (v0 - v) / (steps * lr) for i, s, v0, v in zip(ci, c, x, y, strict=True))
    new_controls.append(ci)
    deltas.append(tuple(v - v0 for v, v0 in zip(y, x, strict=True)))
    weights.append(n if weighting == 'num_examples' else float(n > 0))
  total = sum(weights)
  x = tuple(
    v0 + server_lr * sum(wt * d[k] for wt, d in zip(weights, deltas, strict=True)) / total
    for k, v0 in enumerate(x)
  )
  old = [controls.get(i, (0.0, 0.0)) for i in cohort]
  c = tuple(
    s + sum(new[k] - o[k] for new, o in zip(new_controls, old, strict=True)) / POPULATION
    for k, s in enumerate(c)
  )
  return x, c, new_controls, {'loss': loss_sum / examples, 'num_examples': examples}


def _pair(tree):
  return np.asarray(tree['w'], np.float64), np.asarray(tree['b'], np.float64)


@pytest.mark.parametrize(
  ('weighting', 'server_lr', 'chunk'),
  [('uniform', 1.0, None), ('num_examples', 0.5, 2)],
)
def test_scaffold_equals_numpy_loop(weighting, server_lr, chunk):
  lr = 0.2
  process = fl.algorithms.build_scaffold(
    ref.linear_model(5, 3),
    lr,
    server_lr,
    population_size=POPULATION,
    client_weighting=fl.ClientWeighting(weighting),
    client_chunk_size=chunk,
  )
  store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
  state = process.initialize()
  x = _pair(process.get_model_weights(state).trainable)
  c = (np.zeros_like(x[0]), np.zeros_like(x[1]))
  controls = {}
  for round_num, cohort in enumerate(COHORTS):
    batches = _batches(cohort, round_num)
    state, metrics, new = process.next(state, batches, store.get(cohort))
    store.put(cohort, new)
    x, c, expected, train = scaffold_round(
      x, c, controls, batches, cohort, lr, server_lr, weighting
    )
    controls.update(zip(cohort, expected, strict=True))
    for got, want in [
      (_pair(process.get_model_weights(state).trainable), x),
      (_pair(state.client_work.control_variate), c),
      *[(_pair(jax.tree.map(lambda v, p=p: v[p], new)), e) for p, e in enumerate(expected)],
    ]:
      np.testing.assert_allclose(got[0], want[0], atol=1e-5)
      np.testing.assert_allclose(got[1], want[1], atol=1e-5)
    got_train = metrics['client_work']['train']
    assert int(got_train['num_examples']) == train['num_examples']
    np.testing.assert_allclose(float(got_train['loss']), train['loss'], rtol=1e-5)
  # Clients never sampled have no row and read as zeros; the empty client kept its zeros.
  assert len(store) == 5
  assert not np.any(store.get(['e', 'never seen'])['w'])
  assert np.any(store.get(['a'])['w'])


def test_hyperparameters_in_state():
  process = fl.algorithms.build_scaffold(ref.linear_model(5, 3), 0.1, population_size=7)
  hparams = process.get_hparams(process.initialize())
  assert {k: float(v) for k, v in hparams['client_work'].items()} == pytest.approx(
    {'learning_rate': 0.1, 'population_size': 7.0}
  )
  assert float(hparams['finalizer']['learning_rate']) == 1.0


@pytest.mark.parametrize(
  ('kwargs', 'message'),
  [
    ({'client_learning_rate': 0.0}, 'client_learning_rate must be a finite number > 0'),
    ({'server_learning_rate': float('nan')}, 'server_learning_rate must be a finite number > 0'),
    ({'population_size': 0}, 'population_size must be an int >= 1'),
    ({'population_size': 2.5}, 'population_size must be an int >= 1'),
  ],
)
def test_bad_arguments_are_refused(kwargs, message):
  args = {'client_learning_rate': 0.1, 'population_size': 3, **kwargs}
  with pytest.raises(ValueError, match=message):
    fl.algorithms.build_scaffold(ref.linear_model(5, 3), **args)


def test_next_without_client_states_is_refused():
  process = fl.algorithms.build_scaffold(ref.linear_model(5, 3), 0.1, population_size=3)
  with pytest.raises(TypeError, match='client_states'):
    process.next(process.initialize(), _batches(['a'], 0))


def test_scaffold_converges_under_client_drift_where_fed_avg_stalls():
  """Two clients, f_i(w) = h_i/2·(w − t_i)², curvatures 1 and 10, 20 local steps each: FedAvg's
  clients drift to their own optima and its average settles at ~0.61; SCAFFOLD reaches the
  global optimum Σh_i·t_i / Σh_i = 10/11."""
  model = fl.FunctionalModel(
    initial_weights=fl.ModelWeights({'w': np.zeros((), np.float32)}, ()),
    predict_on_batch_fn=lambda weights, x, training=True: (
      0.5 * x[:, 1] * (weights.trainable['w'] - x[:, 0]) ** 2
    ),
    loss_fn=lambda output, label, sample_weight=None: fl.models.weighted_mean(
      output, sample_weight
    ),
    input_spec={
      'x': jax.ShapeDtypeStruct((None, 2), np.float32),
      'y': jax.ShapeDtypeStruct((None,), np.int32),
    },
  )
  clients = [
    {'x': np.array([[t, h]], np.float32), 'y': np.zeros(1, np.int32)} for t, h in [(0, 1), (1, 10)]
  ]
  batches = fl.data.build_client_batches(clients, batch_size=1, num_epochs=20, shuffle=False)
  scaffold = fl.algorithms.build_scaffold(model, 0.05, population_size=2)
  fed_avg = fl.algorithms.build_unweighted_fed_avg(model, fl.optimizers.build_sgdm(0.05))
  s, a = scaffold.initialize(), fed_avg.initialize()
  controls = jax.tree.map(lambda c: np.stack([c, c]), scaffold.initial_client_state)
  for _ in range(30):
    s, _, controls = scaffold.next(s, batches, controls)
    a, _ = fed_avg.next(a, batches)
  optimum = 10 / 11
  assert abs(float(scaffold.get_model_weights(s).trainable['w']) - optimum) < 1e-3
  assert abs(float(fed_avg.get_model_weights(a).trainable['w']) - optimum) > 0.25
