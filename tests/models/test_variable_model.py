"""fl.models.from_variable_model: a TFF variable model written in nnx against the hand-written
FunctionalModel (numpy_reference.linear_model) and numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from flax import nnx

import fedjax_lite as fl
from fedjax_lite import tree as tree_lib

F, C = 5, 3
SIZES = [7, 20, 1, 0]  # batches of 4: uneven, padded, one client empty
LOCAL_NAMES = ('num_correct', 'num_seen', 'examples_seen')


def _mean(state):
  return state[0] / state[1]


class LinearClassifier(nnx.Module):
  """`logits = x·w + b` as a TFF variable model: metric variables and outputs of the weights."""

  def __init__(self):
    functional = ref.linear_model(F, C)
    self.w = nnx.Param(functional.initial_weights.trainable['w'])
    self.b = nnx.Param(functional.initial_weights.trainable['b'])
    self.num_correct = fl.models.LocalVariable(jnp.zeros(()))
    self.num_seen = fl.models.LocalVariable(jnp.zeros(()))
    self.examples_seen = fl.models.LocalVariable(jnp.zeros((), jnp.int32))
    self.input_spec = functional.input_spec

  def forward_pass(self, batch, training=True):
    logits = batch['x'] @ self.w[...] + self.b[...]
    loss = fl.models.softmax_cross_entropy(logits, batch['y'])
    n = batch['y'].shape[0]
    self.num_correct[...] += jnp.sum(jnp.argmax(logits, -1) == batch['y'])
    self.num_seen[...] += n
    self.examples_seen[...] += n
    return fl.BatchOutput(predictions=logits, loss=loss, num_examples=n)

  def report_local_unfinalized_metrics(self):
    l2 = jnp.sqrt(jnp.sum(self.w[...] ** 2) + jnp.sum(self.b[...] ** 2))
    return {
      'accuracy': (self.num_correct[...], self.num_seen[...]),
      'l2_norm': (l2, 1.0),
      'column_norms': (jnp.linalg.norm(self.w[...], axis=0), 1.0),  # [C]: outputs of any shape
      'examples_squared': self.examples_seen[...] ** 2,  # not additive: shows per-client resets
    }

  def metric_finalizers(self):
    return {
      'accuracy': _mean,
      'l2_norm': _mean,
      'column_norms': _mean,
      'examples_squared': lambda s: s,
    }


def _batches(seed, sizes=SIZES):
  return fl.data.build_client_batches(
    ref.random_clients(sizes, F, C, seed), batch_size=4, seed=seed
  )


def _paths(tree):
  return [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


BUILDERS = {
  'weighted_fed_avg': lambda m: fl.algorithms.build_weighted_fed_avg(
    m, fl.optimizers.build_sgdm(0.1, momentum=0.9), client_chunk_size=3
  ),
  'unweighted_fed_avg': lambda m: fl.algorithms.build_unweighted_fed_avg(
    m, fl.optimizers.build_sgdm(0.1)
  ),
  'fed_sgd': lambda m: fl.algorithms.build_fed_sgd(m, fl.optimizers.build_sgdm(0.5)),
}


@pytest.mark.parametrize('name', sorted(BUILDERS))
def test_equals_hand_written_functional_model_over_three_rounds(name):
  variable = BUILDERS[name](fl.models.from_variable_model(LinearClassifier()))
  functional = BUILDERS[name](ref.linear_model(F, C))
  s1, s2 = variable.initialize(), functional.initialize()
  for round_num in range(3):
    cb = _batches(round_num)
    s1, m1 = variable.next(s1, cb)
    s2, m2 = functional.next(s2, cb)
    for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    t1, t2 = m1['client_work']['train'], m2['client_work']['train']
    for key in ('loss', 'accuracy', 'num_examples'):
      np.testing.assert_allclose(t1[key], t2[key], rtol=1e-6)


def test_weighted_fed_avg_equals_numpy():
  process = fl.algorithms.build_weighted_fed_avg(
    fl.models.from_variable_model(LinearClassifier()), fl.optimizers.build_sgdm(0.1)
  )
  state = process.initialize()
  w, b = (np.asarray(state.global_model_weights.trainable[k], np.float64) for k in 'wb')
  for round_num in range(3):
    cb = _batches(round_num)
    state, metrics = process.next(state, cb)
    w, b, expected = ref.fed_avg_round(w, b, cb, 0.1)
    np.testing.assert_allclose(state.global_model_weights.trainable['w'], w, atol=1e-5)
    for key, value in expected.items():
      np.testing.assert_allclose(metrics['client_work']['train'][key], value, rtol=1e-5)


def test_local_variables_fresh_per_client_and_round_and_never_in_server_state():
  model = fl.models.from_variable_model(LinearClassifier())
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  state = process.initialize()
  for round_num in range(2):
    sizes = [3 + round_num, 6, 0]
    state, metrics = process.next(state, _batches(round_num, sizes))
    # Σ n_c², not (Σ n_c)²: every client counted from zero, every round.
    assert int(metrics['client_work']['train']['examples_squared']) == sum(n * n for n in sizes)
  evaluation = fl.algorithms.build_fed_eval(model)
  eval_state, _ = evaluation.next(evaluation.initialize(), _batches(0))
  for structure in (state, process.state_type, eval_state, evaluation.state_type):
    paths = _paths(structure)
    assert paths and not [p for p in paths for name in LOCAL_NAMES if f"['{name}']" in p]
  assert set(model.initial_weights.trainable) == {'w', 'b'}
  assert model.initial_weights.non_trainable == {}


def _l2(w, b):
  return np.sqrt(np.sum(w**2) + np.sum(b**2))


def test_weight_dependent_outputs_equal_numpy_per_client_and_aggregated():
  process = fl.algorithms.build_weighted_fed_avg(
    fl.models.from_variable_model(LinearClassifier()), fl.optimizers.build_sgdm(0.3)
  )
  state = process.initialize()
  w, b = (np.asarray(state.global_model_weights.trainable[k], np.float64) for k in 'wb')
  cb = _batches(5)
  norms, columns = [], []
  for c in range(len(SIZES)):
    one = jax.tree.map(lambda a, c=c: a[c : c + 1], cb)
    _, metrics = process.next(state, one)
    # With one client and server SGD 1.0 the new model is the client's locally trained one;
    # the empty client keeps the weights it was sent.
    cw, cbias = ref.fed_avg_round(w, b, one, 0.3)[:2] if SIZES[c] else (w, b)
    norms.append(_l2(cw, cbias))
    columns.append(np.linalg.norm(cw, axis=0))
    train = metrics['client_work']['train']
    np.testing.assert_allclose(train['l2_norm'], norms[-1], rtol=1e-5)
    np.testing.assert_allclose(train['column_norms'], columns[-1], rtol=1e-5)
  _, metrics = process.next(state, cb)
  train = metrics['client_work']['train']
  np.testing.assert_allclose(train['l2_norm'], np.mean(norms), rtol=1e-5)
  np.testing.assert_allclose(train['column_norms'], np.mean(columns, axis=0), rtol=1e-5)
  # Evaluation reports the norm of the weights it evaluates.
  evaluation = fl.algorithms.build_fed_eval(fl.models.from_variable_model(LinearClassifier()))
  _, metrics = evaluation.next(evaluation.initialize(), cb)
  current = metrics['client_work']['eval']['current_round_metrics']
  np.testing.assert_allclose(current['l2_norm'], _l2(w, b), rtol=1e-5)


def test_padding_changes_nothing():
  model = fl.models.from_variable_model(LinearClassifier())
  fl.models.check_padding_invariance(model)
  batch = ref.random_clients([6], F, C)[0]
  mask = jnp.array([1, 1, 1, 1, 0, 0], jnp.float32)
  junk = {'x': batch['x'].copy(), 'y': batch['y']}
  junk['x'][4:] = 1e6
  real = {k: v[:4] for k, v in batch.items()}
  padded = model.forward_pass(model.initial_weights, junk, mask=mask)
  unpadded = model.forward_pass(model.initial_weights, real)
  np.testing.assert_allclose(padded.loss, unpadded.loss, rtol=1e-6)
  assert int(padded.num_examples) == 4
  for a, b in zip(
    jax.tree.leaves(padded.local_updates), jax.tree.leaves(unpadded.local_updates), strict=True
  ):
    np.testing.assert_allclose(a, b)
  assert int(padded.local_updates['examples_seen']) == 4


class NoForwardPass(nnx.Module):
  def __init__(self):
    self.w = nnx.Param(jnp.zeros((F, C)))
    self.input_spec = ref.linear_model(F, C).input_spec


class WritesParam(LinearClassifier):
  def forward_pass(self, batch, training=True):
    self.b[...] += 1.0
    return super().forward_pass(batch, training)


class GrowingLocal(LinearClassifier):
  def __init__(self):
    super().__init__()
    self.seen_labels = fl.models.LocalVariable(jnp.zeros((0,), jnp.int32))

  def forward_pass(self, batch, training=True):
    self.seen_labels.set_value(jnp.concatenate([self.seen_labels[...], batch['y']]))
    return super().forward_pass(batch, training)


class FederatedOutput(LinearClassifier):
  federated_output_computation = staticmethod(lambda outputs: outputs)


class WithBatchNorm(LinearClassifier):
  """Logits through a BatchNorm, nested in a Sequential as a layer would be."""

  def __init__(self, use_running_average=False):
    super().__init__()
    bn = nnx.BatchNorm(C, use_running_average=use_running_average, rngs=nnx.Rngs(0))
    self.head = nnx.Sequential(lambda h: h, bn)

  def forward_pass(self, batch, training=True):
    logits = self.head(batch['x'] @ self.w[...] + self.b[...])
    loss = fl.models.softmax_cross_entropy(logits, batch['y'])
    return fl.BatchOutput(predictions=logits, loss=loss, num_examples=batch['y'].shape[0])


@pytest.mark.parametrize(
  ('module', 'error', 'match'),
  [
    (NoForwardPass, TypeError, 'NoForwardPass has no forward_pass method'),
    (WritesParam, ValueError, r"writes the nnx.Param \['b'\]"),
    (GrowingLocal, ValueError, r"\['seen_labels'\] is int32\[1\]; expected int32\[0\]"),
    (FederatedOutput, ValueError, 'federated_output_computation'),
    (
      WithBatchNorm,
      ValueError,
      r'WithBatchNorm\.head\.layers\.1 is a BatchNorm that forward_pass\(training=True\) runs on '
      r"batch statistics \(it updates \['head'\]\['layers'\]\[1\]\['mean'\].*Tip: .*from_flax",
    ),
  ],
)
def test_bad_modules_fail_at_construction(module, error, match):
  with pytest.raises(error, match=match):
    fl.models.from_variable_model(module())


def test_loss_of_predictions_alone_is_refused():
  model = fl.models.from_variable_model(LinearClassifier())
  with pytest.raises(TypeError, match='no loss of predictions alone'):
    model.loss(jnp.zeros((2, C)), jnp.zeros((2,), jnp.int32))
  predictions = model.predict_on_batch(model.initial_weights, jnp.ones((2, F)))
  expected = np.ones((2, F)) @ model.initial_weights.trainable['w']
  np.testing.assert_allclose(predictions, expected + model.initial_weights.trainable['b'], 1e-6)
  assert tree_lib.tree_spec_mismatch(predictions, jnp.zeros((2, C))) is None


def test_a_frozen_batch_norm_is_per_example_and_accepted():
  """Normalizing by running statistics treats examples independently: nothing to refuse."""
  model = fl.models.from_variable_model(WithBatchNorm(use_running_average=True))
  batch = ref.random_clients([4], F, C)[0]
  out = model.forward_pass(model.initial_weights, batch)
  expected = (
    batch['x'] @ model.initial_weights.trainable['w'] + model.initial_weights.trainable['b']
  )
  np.testing.assert_allclose(out.predictions, expected / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_a_module_called_before_wrapping_starts_every_client_from_the_initial_values():
  """Its local variables hold what the call accumulated; every client must start from the
  values they were constructed with, as with a fresh module."""
  called = LinearClassifier()
  called.forward_pass(ref.random_clients([8], F, C, seed=9)[0])
  assert int(called.examples_seen[...]) == 8 and called.examples_seen.initial_value == 0
  fresh = fl.models.from_variable_model(LinearClassifier())
  wrapped = fl.models.from_variable_model(called)
  for got, expected in zip(
    jax.tree.leaves(wrapped.initialize_metrics_state()),
    jax.tree.leaves(fresh.initialize_metrics_state()),
    strict=True,
  ):
    np.testing.assert_array_equal(got, expected)
  cb = _batches(3)
  metrics = []
  for model in (wrapped, fresh):
    evaluation = fl.algorithms.build_fed_eval(model)
    metrics.append(evaluation.next(evaluation.initialize(), cb)[1])
  jax.tree.map(np.testing.assert_array_equal, *metrics)
  train = [fl.algorithms.build_fed_sgd(m, fl.optimizers.build_sgdm(0.5)) for m in (wrapped, fresh)]
  jax.tree.map(np.testing.assert_array_equal, *(p.next(p.initialize(), cb)[1] for p in train))
