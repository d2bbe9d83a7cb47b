"""FedAvg, FedSGD and FedEval against plain numpy loops over clients."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]  # different sizes, partial last batches


def _weights(state, process):
  t = process.get_model_weights(state).trainable
  return np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)


@pytest.mark.parametrize(
  ('builder', 'weighting', 'momentum', 'chunk'),
  [
    (fl.algorithms.build_weighted_fed_avg, 'num_examples', None, None),
    (fl.algorithms.build_weighted_fed_avg, 'num_examples', 0.9, 3),
    (fl.algorithms.build_unweighted_fed_avg, 'uniform', None, 1),
    (fl.algorithms.build_unweighted_fed_avg, 'uniform', 0.5, 4),
  ],
)
def test_fed_avg_equals_numpy_loop(builder, weighting, momentum, chunk):
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  process = builder(
    model, fl.optimizers.build_sgdm(0.1, momentum=momentum), client_chunk_size=chunk
  )
  state = process.initialize()
  w, b = _weights(state, process)
  for round_num in range(3):
    batches = fl.data.build_client_batches(clients, batch_size=4, num_epochs=2, seed=round_num)
    state, metrics = process.next(state, batches)
    w, b, expected = ref.fed_avg_round(w, b, batches, 0.1, momentum, weighting)
    got_w, got_b = _weights(state, process)
    np.testing.assert_allclose(got_w, w, atol=1e-5)
    np.testing.assert_allclose(got_b, b, atol=1e-5)
    train = metrics['client_work']['train']
    assert int(train['num_examples']) == 2 * sum(SIZES) == expected['num_examples']
    np.testing.assert_allclose(float(train['loss']), expected['loss'], rtol=1e-5)
    np.testing.assert_allclose(float(train['accuracy']), expected['accuracy'], rtol=1e-6)
    assert int(metrics['client_work']['non_finite_clients']) == 0
    assert int(metrics['finalizer']['update_non_finite']) == 0


def test_chunk_sizes_agree():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients(SIZES * 2), batch_size=3)
  results = []
  for chunk in [1, 3, 5, 8, 100]:
    process = fl.algorithms.build_weighted_fed_avg(
      model, fl.optimizers.build_sgdm(0.2), client_chunk_size=chunk
    )
    state, _ = process.next(process.initialize(), batches)
    results.append(_weights(state, process))
  for w, b in results[1:]:
    np.testing.assert_allclose(w, results[0][0], atol=1e-6)
    np.testing.assert_allclose(b, results[0][1], atol=1e-6)


@pytest.mark.parametrize('algorithm', ['fed_sgd', 'fed_avg'])
def test_one_client_one_step_is_one_sgd_step(algorithm):
  model = ref.linear_model(4, 3)
  clients = ref.random_clients([6], num_features=4)
  batches = fl.data.build_client_batches(clients, batch_size=6, shuffle=False)
  if algorithm == 'fed_sgd':
    process = fl.algorithms.build_fed_sgd(model, fl.optimizers.build_sgdm(0.3))
  else:
    process = fl.algorithms.build_weighted_fed_avg(
      model, fl.optimizers.build_sgdm(0.3), fl.optimizers.build_sgdm(1.0)
    )
  state = process.initialize()
  w, b = _weights(state, process)
  state, _ = process.next(state, batches)
  _, gw, gb, _ = ref.loss_and_grads(w, b, clients[0]['x'], clients[0]['y'])
  got_w, got_b = _weights(state, process)
  np.testing.assert_allclose(got_w, w - 0.3 * gw, atol=1e-6)
  np.testing.assert_allclose(got_b, b - 0.3 * gb, atol=1e-6)


def test_fed_sgd_averages_gradients_over_all_examples():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients([5, 9])
  batches = fl.data.build_client_batches(clients, batch_size=2)
  process = fl.algorithms.build_fed_sgd(model, fl.optimizers.build_sgdm(0.5))
  state = process.initialize()
  w, b = _weights(state, process)
  state, metrics = process.next(state, batches)
  x = np.concatenate([c['x'] for c in clients])
  y = np.concatenate([c['y'] for c in clients])
  _, gw, gb, _ = ref.loss_and_grads(w, b, x, y)
  got_w, got_b = _weights(state, process)
  np.testing.assert_allclose(got_w, w - 0.5 * gw, atol=1e-6)
  np.testing.assert_allclose(got_b, b - 0.5 * gb, atol=1e-6)
  assert int(metrics['client_work']['train']['num_examples']) == 14


def _poison(batches, client):
  x = np.array(batches.batch['x'])
  x[client, 0, 0, 0] = np.nan
  return fl.ClientBatches({'x': x, 'y': batches.batch['y']}, batches.mask)


def test_nan_client_is_excluded():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  batches = fl.data.build_client_batches(clients, batch_size=4)
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  state = process.initialize()
  w, b = _weights(state, process)
  new_state, metrics = process.next(state, _poison(batches, 1))
  healthy = fl.data.build_client_batches([clients[i] for i in (0, 2, 3)], batch_size=4)
  # The same shuffles: the builder seeds by position, so rebuild the survivors from `batches`.
  healthy = fl.ClientBatches(
    {k: np.asarray(v)[[0, 2, 3]] for k, v in batches.batch.items()},
    np.asarray(batches.mask)[[0, 2, 3]],
  )
  w, b, expected = ref.fed_avg_round(w, b, healthy, 0.1)
  got_w, got_b = _weights(new_state, process)
  np.testing.assert_allclose(got_w, w, atol=1e-5)
  np.testing.assert_allclose(got_b, b, atol=1e-5)
  train = metrics['client_work']['train']
  assert int(train['num_examples']) == expected['num_examples'] == sum(SIZES) - SIZES[1]
  assert int(metrics['client_work']['non_finite_clients']) == 1
  assert int(metrics['finalizer']['update_non_finite']) == 0


def test_all_nan_round_leaves_model_unchanged_and_reports_it():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([4, 6]), batch_size=4)
  x = np.full_like(batches.batch['x'], np.nan)
  poisoned = fl.ClientBatches({'x': x, 'y': batches.batch['y']}, batches.mask)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0, momentum=0.9)
  )
  state = process.initialize()
  new_state, metrics = process.next(state, poisoned)
  for before, after in zip(jax.tree.leaves(state), jax.tree.leaves(new_state), strict=True):
    if before.dtype != np.uint32:  # the client-work rng advances every round
      np.testing.assert_array_equal(before, after)
  assert int(metrics['client_work']['non_finite_clients']) == 2
  assert int(metrics['client_work']['train']['num_examples']) == 0
  assert float(metrics['aggregator']['total_weight']) == 0.0
  assert int(metrics['finalizer']['update_non_finite']) == 1


def test_non_finite_aggregate_is_rejected_by_the_finalizer():
  weights = fl.ModelWeights({'w': np.ones(3, np.float32)}, ())
  finalizer = fl.templates.build_apply_optimizer_finalizer(
    fl.optimizers.build_sgdm(1.0, momentum=0.9), weights
  )
  state = finalizer.initialize()
  out = finalizer.next(state, weights, {'w': np.array([1.0, np.inf, 0.0], np.float32)})
  np.testing.assert_array_equal(out.result.trainable['w'], weights.trainable['w'])
  assert int(out.measurements['update_non_finite']) == 1
  out = finalizer.next(state, weights, {'w': np.array([1.0, 2.0, 0.0], np.float32)})
  np.testing.assert_allclose(out.result.trainable['w'], [0.0, -1.0, 1.0])
  assert int(out.measurements['update_non_finite']) == 0


def test_set_hparams_changes_client_lr_without_recompiling():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  batches = fl.data.build_client_batches(clients, batch_size=4, num_steps=9)
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  state = process.initialize()
  state, _ = process.next(state, batches)
  compiled = process.next._cache_size()
  assert compiled == 1
  hparams = process.get_hparams(state)
  assert set(hparams) == {'client_work', 'finalizer'}
  np.testing.assert_allclose(hparams['client_work']['learning_rate'], 0.1)
  state = process.set_hparams(state, {'client_work': {'learning_rate': 0.02}})
  w, b = _weights(state, process)
  other = fl.data.build_client_batches(clients[::-1], batch_size=4, num_steps=9, seed=5)
  state, _ = process.next(state, other)
  assert process.next._cache_size() == compiled  # a new lr and new data: no new program
  w, b, _ = ref.fed_avg_round(w, b, other, 0.02)
  got_w, got_b = _weights(state, process)
  np.testing.assert_allclose(got_w, w, atol=1e-5)
  np.testing.assert_allclose(got_b, b, atol=1e-5)
  with pytest.raises(ValueError, match='unknown keys'):
    process.set_hparams(state, {'client_work': {'lr': 0.1}})


def test_repeated_round_compiles_nothing():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4, num_steps=9)
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  state = process.initialize()
  state, _ = process.next(state, batches)
  with jax.log_compiles():
    import logging

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logger = logging.getLogger('jax')
    logger.addHandler(handler)
    try:
      for _ in range(3):
        state, _ = process.next(state, batches)
      jax.block_until_ready(state)
    finally:
      logger.removeHandler(handler)
  compiles = [r for r in records if 'Compiling' in r.getMessage()]
  assert compiles == []


def test_fed_eval_equals_numpy_metrics():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  batches = fl.data.build_client_batches(clients, batch_size=4)
  evaluation = fl.algorithms.build_fed_eval(model)
  state = evaluation.initialize()
  w, b = _weights(state, evaluation)
  state, metrics = evaluation.next(state, batches)
  state, metrics2 = evaluation.next(state, batches)
  x = np.concatenate([c['x'] for c in clients])
  y = np.concatenate([c['y'] for c in clients])
  p = ref.softmax(x @ w + b)
  loss = -np.mean(np.log(p[np.arange(len(y)), y]))
  accuracy = np.mean(p.argmax(axis=1) == y)
  current = metrics['client_work']['eval']['current_round_metrics']
  np.testing.assert_allclose(float(current['loss']), loss, rtol=1e-5)
  np.testing.assert_allclose(float(current['accuracy']), accuracy, rtol=1e-6)
  assert int(current['num_examples']) == len(y)
  total = metrics2['client_work']['eval']['total_rounds_metrics']
  assert int(total['num_examples']) == 2 * len(y)
  np.testing.assert_allclose(float(total['loss']), loss, rtol=1e-5)
  np.testing.assert_array_equal(_weights(state, evaluation)[0], w)  # nothing trained


def test_fed_eval_ignores_padding():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  batches = fl.data.build_client_batches(clients, batch_size=4)
  padded = fl.data.build_client_batches(
    [*clients, {'x': np.zeros((0, 5), np.float32), 'y': np.zeros(0, np.int32)}],
    batch_size=4,
    num_steps=20,
  )
  evaluation = fl.algorithms.build_fed_eval(model)
  _, metrics = evaluation.next(evaluation.initialize(), batches)
  _, padded_metrics = evaluation.next(evaluation.initialize(), padded)
  a = metrics['client_work']['eval']['current_round_metrics']
  b = padded_metrics['client_work']['eval']['current_round_metrics']
  assert int(a['num_examples']) == int(b['num_examples']) == sum(SIZES)
  np.testing.assert_allclose(b['loss'], a['loss'], rtol=1e-6)
  np.testing.assert_allclose(b['accuracy'], a['accuracy'], rtol=1e-6)


def test_dropout_model_gets_a_fresh_key_per_round_client_and_step():
  import flax.linen as nn
  import jax.numpy as jnp

  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      x = nn.Dropout(0.5, deterministic=not train)(x)
      return nn.Dense(3)(x)

  spec = {
    'x': jax.ShapeDtypeStruct((None, 5), jnp.float32),
    'y': jax.ShapeDtypeStruct((None,), jnp.int32),
  }
  model = fl.models.from_flax(
    Net(), input_spec=spec, loss_fn=fl.models.softmax_cross_entropy, training_arg='train'
  )
  assert model.uses_rng
  batches = fl.data.build_client_batches(ref.random_clients([6, 6]), batch_size=3)
  # Two identical clients: different dropout keys make their updates differ.
  same = fl.ClientBatches(
    jax.tree.map(lambda a: np.stack([a[0], a[0]]), batches.batch), batches.mask
  )
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.5))
  state = work.initialize()
  out = work.next(state, model.initial_weights, same)
  kernel = out.result.update['Dense_0']['kernel']
  assert not np.allclose(kernel[0], kernel[1])
  again = work.next(state, model.initial_weights, same)  # same state: bit-identical
  np.testing.assert_array_equal(again.result.update['Dense_0']['kernel'], kernel)
  later = work.next(out.state, model.initial_weights, same)  # the key advances each round
  assert not np.allclose(later.result.update['Dense_0']['kernel'], kernel)


def test_callable_client_weighting_sees_finalized_client_metrics():
  import jax.numpy as jnp

  seen = []

  def weighting(metrics):
    seen.append(sorted(metrics))
    return jnp.sqrt(metrics['num_examples'].astype(jnp.float32))

  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), client_weighting=weighting
  )
  state = process.initialize()
  w, b = _weights(state, process)
  state, _ = process.next(state, batches)
  assert seen and seen[-1] == ['accuracy', 'loss', 'num_examples']
  w, b, _ = ref.fed_avg_round(w, b, batches, 0.1, weighting=np.sqrt)
  got_w, got_b = _weights(state, process)
  np.testing.assert_allclose(got_w, w, atol=1e-5)
  np.testing.assert_allclose(got_b, b, atol=1e-5)


def test_set_hparams_changes_the_server_learning_rate():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0)
  )
  state = process.initialize()
  w, b = _weights(state, process)
  state = process.set_hparams(state, {'finalizer': {'learning_rate': 0.5}})
  np.testing.assert_allclose(process.get_hparams(state)['finalizer']['learning_rate'], 0.5)
  state, _ = process.next(state, batches)
  avg_w, avg_b, _ = ref.fed_avg_round(w, b, batches, 0.1)
  got_w, got_b = _weights(state, process)
  np.testing.assert_allclose(got_w, w + 0.5 * (avg_w - w), atol=1e-5)  # half-way to the average
  np.testing.assert_allclose(got_b, b + 0.5 * (avg_b - b), atol=1e-5)
  with pytest.raises(ValueError, match='unknown keys'):
    process.set_hparams(state, {'server': {}})
