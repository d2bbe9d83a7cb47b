"""build_fed_recon / build_fed_recon_eval against numpy loops, FedAvg, and privacy checks."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl
import fedjax_lite.reconstruction
from fedjax_lite import tree as tree_lib

F = 3
SIZES = [9, 5, 2]  # batches of 2: 5, 3 and 1 (the last client has nothing to post-reconstruct)


def _linear_recon_model():
  """`y = x·w + b + c`: w global trainable, b local trainable, c global non-trainable."""
  rng = np.random.default_rng(0)
  weights = fl.ModelWeights(
    {'w': rng.standard_normal(F).astype(np.float32), 'b': np.float32(0.3)}, {'c': np.float32(0.5)}
  )

  def predict(weights, x, training=True):
    del training
    return x @ weights.trainable['w'] + weights.trainable['b'] + weights.non_trainable['c']

  model = fl.FunctionalModel(
    initial_weights=weights,
    predict_on_batch_fn=predict,
    loss_fn=fl.models.mean_squared_error,
    input_spec={
      'x': jax.ShapeDtypeStruct((None, F), jnp.float32),
      'y': jax.ShapeDtypeStruct((None,), jnp.float32),
    },
  )
  return fl.reconstruction.ReconstructionModel(
    model, fl.ModelWeights({'w': False, 'b': True}, False)
  )


def _client_batches(seed):
  rng = np.random.default_rng(seed)
  clients = [
    {
      'x': rng.standard_normal((n, F)).astype(np.float32),
      'y': rng.standard_normal(n).astype(np.float32),
    }
    for n in SIZES
  ]
  return fl.data.build_client_batches(clients, batch_size=2, seed=seed)


def _batches(cb, c):
  mask = np.asarray(cb.mask[c])
  x, y = np.asarray(cb.batch['x'][c], np.float64), np.asarray(cb.batch['y'][c], np.float64)
  return [(x[s][mask[s] > 0], y[s][mask[s] > 0]) for s in range(mask.shape[0]) if mask[s].any()]


def _reconstruct(w, b0, c, batches, lr):
  b = b0
  for x, y in batches[0::2]:  # even batches reconstruct
    b -= lr * 2 * np.mean(x @ w + b + c - y)
  return b


def _numpy_round(w, cb, lr_recon, lr_client, lr_server, joint=False, b0=0.3, c=0.5):
  """One FedRecon round (split_dataset=True, one epoch each, SGD everywhere)."""
  deltas, weights, loss_sum = [], [], 0.0
  for client in range(len(SIZES)):
    batches = _batches(cb, client)
    b = _reconstruct(w, b0, c, batches, lr_recon)
    wc, n = w.copy(), 0
    for x, y in batches[1::2]:  # odd batches train
      err = x @ wc + b + c - y
      loss_sum += np.mean(err**2) * len(y)
      n += len(y)
      gw, gb = 2 * x.T @ err / len(y), 2 * np.mean(err)
      wc = wc - lr_client * gw
      if joint:
        b -= lr_client * gb
    deltas.append(w - wc)
    weights.append(n)
  mean_delta = sum(wt * d for wt, d in zip(weights, deltas, strict=True)) / sum(weights)
  return w - lr_server * mean_delta, {'loss': loss_sum / sum(weights), 'num_examples': sum(weights)}


def _numpy_eval(w, cb, lr_recon, b0=0.3, c=0.5):
  loss_sum, n = 0.0, 0
  for client in range(len(SIZES)):
    batches = _batches(cb, client)
    b = _reconstruct(w, b0, c, batches, lr_recon)
    for x, y in batches[1::2]:
      loss_sum += np.sum((x @ w + b + c - y) ** 2)
      n += len(y)
  return loss_sum / n, n


@pytest.mark.parametrize(('joint', 'chunk'), [(False, None), (True, 2)])
def test_training_rounds_equal_numpy(joint, chunk):
  recon = _linear_recon_model()
  process = fl.reconstruction.build_fed_recon(
    recon,
    loss_fn=fl.models.mean_squared_error,
    server_optimizer=fl.optimizers.build_sgdm(0.7),
    client_optimizer=fl.optimizers.build_sgdm(0.05),
    reconstruction_optimizer=fl.optimizers.build_sgdm(0.2),
    jointly_train_variables=joint,
    client_chunk_size=chunk,
  )
  state = process.initialize()
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64)
  for round_num in range(3):
    cb = _client_batches(round_num)
    state, metrics = process.next(state, cb)
    w, expected = _numpy_round(w, cb, 0.2, 0.05, 0.7, joint)
    np.testing.assert_allclose(state.global_model_weights.trainable['w'], w, atol=1e-5)
    train = metrics['client_work']['train']
    assert int(train['num_examples']) == expected['num_examples']
    np.testing.assert_allclose(float(train['loss']), expected['loss'], rtol=1e-5)
    # The global non-trainable is read, never changed; the local bias is not in the state.
    assert float(state.global_model_weights.non_trainable['c']) == 0.5
    assert 'b' not in jax.tree_util.tree_leaves_with_path(state.global_model_weights)


def test_reconstruction_then_evaluation_equals_numpy():
  recon = _linear_recon_model()
  evaluation = fl.reconstruction.build_fed_recon_eval(
    recon, reconstruction_optimizer=fl.optimizers.build_sgdm(0.3)
  )
  state = evaluation.initialize()
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64) + 0.1
  trainable = {**state.global_model_weights.trainable, 'w': jnp.asarray(w, jnp.float32)}
  weights = state.global_model_weights._replace(trainable=trainable)
  state = evaluation.set_model_weights(state, weights)
  total_loss, total_n = 0.0, 0
  for round_num in range(2):
    cb = _client_batches(round_num)
    state, metrics = evaluation.next(state, cb)
    loss, n = _numpy_eval(w, cb, 0.3)
    current = metrics['client_work']['eval']['current_round_metrics']
    np.testing.assert_allclose(float(current['loss']), loss, rtol=1e-5)
    assert int(current['num_examples']) == n
    total_loss, total_n = total_loss + loss * n, total_n + n
  total = metrics['client_work']['eval']['total_rounds_metrics']
  np.testing.assert_allclose(float(total['loss']), total_loss / total_n, rtol=1e-5)
  # Hyperparameters take effect without recompiling.
  state = evaluation.set_hparams(
    state, {'client_work': {'reconstruction_optimizer': {'learning_rate': 0.0}}}
  )
  _, metrics = evaluation.next(state, cb)
  loss, _ = _numpy_eval(w, cb, 0.0)
  np.testing.assert_allclose(
    float(metrics['client_work']['eval']['current_round_metrics']['loss']), loss, rtol=1e-5
  )
  assert evaluation.next._cache_size() == 1


def test_no_locals_and_no_split_is_fed_avg():
  momentum = 0.9
  model = ref.linear_model(5, 3)
  recon = fl.reconstruction.ReconstructionModel(model, False)
  fed_recon = fl.reconstruction.build_fed_recon(
    recon,
    client_optimizer=fl.optimizers.build_sgdm(0.1, momentum=momentum),
    dataset_split_fn=fl.reconstruction.build_dataset_split_fn(split_dataset=False),
  )
  fed_avg = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1, momentum=momentum)
  )
  s1, s2 = fed_recon.initialize(), fed_avg.initialize()
  for round_num in range(3):
    cb = fl.data.build_client_batches(ref.random_clients([7, 20, 1]), batch_size=4, seed=round_num)
    s1, m1 = fed_recon.next(s1, cb)
    s2, m2 = fed_avg.next(s2, cb)
    for a, b in zip(
      jax.tree.leaves(s1.global_model_weights),
      jax.tree.leaves(s2.global_model_weights),
      strict=True,
    ):
      np.testing.assert_allclose(a, b, atol=1e-6)
    for key in ('loss', 'accuracy', 'num_examples'):
      np.testing.assert_allclose(
        m1['client_work']['train'][key], m2['client_work']['train'][key], rtol=1e-6
      )


def test_hparams_of_all_three_optimizers():
  recon = _linear_recon_model()
  process = fl.reconstruction.build_fed_recon(recon)
  state = process.initialize()
  hparams = process.get_hparams(state)
  assert set(hparams['client_work']) == {'client_optimizer', 'reconstruction_optimizer'}
  assert float(hparams['finalizer']['learning_rate']) == 1.0
  new = {
    'client_work': {
      'client_optimizer': {'learning_rate': 0.05},
      'reconstruction_optimizer': {'learning_rate': 0.2},
    },
    'finalizer': {'learning_rate': 0.7},
  }
  state = process.set_hparams(state, new)
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64)
  cb = _client_batches(0)
  state, _ = process.next(state, cb)
  w, _ = _numpy_round(w, cb, 0.2, 0.05, 0.7)
  np.testing.assert_allclose(state.global_model_weights.trainable['w'], w, atol=1e-5)
  with pytest.raises(ValueError, match='unknown keys'):
    process.set_hparams(state, {'client_work': {'server': {}}})


class _RecordingMean:
  """MeanFactory that records the trees its process is created for and fed with."""

  def __init__(self):
    self.seen = []

  def create(self, value_spec):
    self.seen.append(value_spec)
    inner = fl.aggregators.MeanFactory().create(value_spec)

    def next_fn(state, value, weight):
      self.seen.append(value)
      return inner.next(state, value, weight)

    return fl.templates.AggregationProcess(inner.initialize, next_fn)


def _paths(tree):
  return {jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)}


def _mf_recon(local_initializer=None):
  model = fl.models.matrix_factorization(1, 6, 3, personal=True)
  return fl.reconstruction.ReconstructionModel(
    model, lambda path: 'user' in path, local_initializer=local_initializer
  )


def _mf_batches():
  rng = np.random.default_rng(0)
  clients = [
    {'x': rng.integers(0, 6, n).astype(np.int32), 'y': rng.integers(1, 6, n).astype(np.float32)}
    for n in [6, 9, 4]
  ]
  return fl.data.build_client_batches(clients, batch_size=2)


def test_local_weights_never_reach_the_server():
  """Structural: no local leaf in the server state, the aggregator's input or the metrics; and
  perturbing the local initial values leaves the server state's tree and shapes as they were."""
  base = _mf_recon().model.initial_weights

  def perturbed(key):
    user = 5 * jax.random.normal(key, (3,))
    return base._replace(trainable={**base.trainable, 'user_embedding': user})

  states = []
  for local_initializer in [None, perturbed]:
    aggregator = _RecordingMean()
    process = fl.reconstruction.build_fed_recon(
      _mf_recon(local_initializer), model_aggregator=aggregator
    )
    initial = process.initialize()
    state, metrics = process.next(initial, _mf_batches())
    # aggregator.seen: the spec it was created for, then the client results it was fed.
    for tree in [initial, state, metrics, *aggregator.seen]:
      assert not any('user' in p for p in _paths(tree)), _paths(tree)
    assert _paths(aggregator.seen[-1]) == {"['global_bias']", "['item_bias']", "['item_embedding']"}
    assert _paths(state.global_model_weights) == {
      ".trainable['global_bias']",
      ".trainable['item_bias']",
      ".trainable['item_embedding']",
    }
    assert tree_lib.tree_spec_mismatch(initial, state) is None
    states.append(state)
  assert tree_lib.tree_spec_mismatch(states[0], states[1]) is None
  # The locals did change training (the globals differ), yet never appear in the state.
  a, b = (s.global_model_weights.trainable['item_embedding'] for s in states)
  assert not np.allclose(a, b)
  # Same seed, same run: bit-identical.
  again, _ = process.next(process.initialize(), _mf_batches())
  for x, y in zip(jax.tree.leaves(again), jax.tree.leaves(states[1]), strict=True):
    np.testing.assert_array_equal(x, y)


def test_non_finite_client_is_zeroed():
  recon = _linear_recon_model()
  cb = _client_batches(0)
  y = np.array(cb.batch['y'])
  y[0, 1, 0] = np.inf  # client 0's first post-reconstruction batch
  process = fl.reconstruction.build_fed_recon(recon)
  state, metrics = process.next(
    process.initialize(), fl.ClientBatches({**cb.batch, 'y': y}, cb.mask)
  )
  assert int(metrics['client_work']['non_finite_clients']) == 1
  assert tree_lib.tree_all_finite(state.global_model_weights)
  assert int(metrics['client_work']['train']['num_examples']) == 2  # client 1's odd batch


def test_uniform_weighting():
  recon = _linear_recon_model()
  cb = _client_batches(0)
  work = fl.reconstruction.build_reconstruction_client_work(
    recon,
    client_optimizer=fl.optimizers.build_sgdm(0.1),
    reconstruction_optimizer=fl.optimizers.build_sgdm(0.1),
    dataset_split_fn=fl.reconstruction.build_dataset_split_fn(split_dataset=True),
    client_weighting=fl.ClientWeighting.UNIFORM,
  )
  out = work.next(work.initialize(), recon.initial_global_weights, cb)
  np.testing.assert_array_equal(out.result.update_weight, [1.0, 1.0, 0.0])


def test_bad_input_errors():
  recon = _linear_recon_model()
  with pytest.raises(TypeError, match=r'loss_fn must take \(predictions, labels, sample_weight\)'):
    fl.reconstruction.build_fed_recon(recon, loss_fn=lambda predictions, labels: 0.0)
  with pytest.raises(ValueError, match=r'loss_fn must return a \[\] scalar'):
    fl.reconstruction.build_fed_recon(recon, loss_fn=lambda p, y, w=None: (p - y) ** 2)
  with pytest.raises(TypeError, match='ReconstructionModel'):
    fl.reconstruction.build_fed_recon(recon.model)
  all_local = fl.reconstruction.ReconstructionModel(recon.model, fl.ModelWeights(True, False))
  with pytest.raises(ValueError, match='no global trainable weights'):
    fl.reconstruction.build_fed_recon(all_local)
  with pytest.raises(TypeError, match=r'dataset_split_fn must return \(reconstruction'):
    fl.reconstruction.build_fed_recon(recon, dataset_split_fn=lambda cb: [cb])
  with pytest.raises(TypeError, match='returned one ClientBatches; expected a'):
    fl.reconstruction.build_fed_recon(recon, dataset_split_fn=lambda cb: cb)
  with pytest.raises(TypeError, match='returned a dict as its reconstruction part'):
    fl.reconstruction.build_fed_recon(recon, dataset_split_fn=lambda cb: (cb.batch, cb))
  with pytest.raises(TypeError, match='reconstruction_optimizer must be an optax'):
    fl.reconstruction.build_fed_recon_eval(recon, reconstruction_optimizer=0.1)
