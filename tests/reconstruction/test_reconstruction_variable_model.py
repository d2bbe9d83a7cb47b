"""fl.reconstruction.from_variable_model: TFF's reconstruction variable model in nnx, its four
variable groups, and FedRecon against the numpy reference of test_fed_recon."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import test_fed_recon as recon_ref
from flax import nnx, traverse_util

import fedjax_lite as fl


class UserParam(nnx.Param):
  """A local trainable weight."""


class UserOffset(nnx.Variable):
  """A local non-trainable weight."""


class Constant(nnx.Variable):
  """A global non-trainable weight."""


class LinearRegression(nnx.Module):
  """`y = x·w + b + c + d` (test_fed_recon's model plus a local non-trainable d = 0): w global
  trainable, b local trainable, c global non-trainable; a squared-error total as metric."""

  def __init__(self):
    weights = recon_ref._linear_recon_model().model.initial_weights
    self.w = nnx.Param(weights.trainable['w'])
    self.b = UserParam(weights.trainable['b'])
    self.c = Constant(weights.non_trainable['c'])
    self.d = UserOffset(jnp.float32(0.0))
    self.squared_error = fl.models.LocalVariable(jnp.zeros(()))
    self.num_examples = fl.models.LocalVariable(jnp.zeros(()))
    self.input_spec = recon_ref._linear_recon_model().input_spec

  def forward_pass(self, batch, training=True):
    predictions = batch['x'] @ self.w[...] + self.b[...] + self.c[...] + self.d[...]
    loss = fl.models.mean_squared_error(predictions, batch['y'])
    self.squared_error[...] += jnp.sum((predictions - batch['y']) ** 2)
    self.num_examples[...] += batch['y'].shape[0]
    return fl.BatchOutput(predictions=predictions, loss=loss, num_examples=batch['y'].shape[0])

  def report_local_unfinalized_metrics(self):
    return {'mse': (self.squared_error[...], self.num_examples[...])}

  def metric_finalizers(self):
    return {'mse': lambda s: s[0] / jnp.maximum(s[1], 1.0)}


def _present(group):
  """`{path: value}` of a group's leaves, the other half's masked leaves left out."""
  flat = traverse_util.flatten_dict(group)
  return {k: v for k, v in flat.items() if not isinstance(v, optax.MaskedNode)}


@pytest.mark.parametrize(
  'local', [nnx.Any(UserParam, UserOffset), nnx.PathContains('b'), lambda path, _: path[-1] == 'd']
)
def test_four_variable_groups_match_the_module(local):
  module = LinearRegression()
  recon = fl.reconstruction.from_variable_model(module, local=local)

  def own(kind, want_local):
    """The module's own variables of one group, selected by nnx."""
    marker = local if want_local else nnx.Not(local)
    state = nnx.state(module, nnx.All(kind, marker, nnx.Not(fl.models.LocalVariable)))
    return traverse_util.flatten_dict(nnx.to_pure_dict(state))

  groups = {
    'global_trainable_variables': own(nnx.Param, False),
    'global_non_trainable_variables': own(nnx.Not(nnx.Param), False),
    'local_trainable_variables': own(nnx.Param, True),
    'local_non_trainable_variables': own(nnx.Not(nnx.Param), True),
  }
  for name, expected in groups.items():
    got = _present(getattr(recon, name))
    assert set(got) == set(expected), name
    for k in got:
      np.testing.assert_array_equal(got[k], expected[k])


def test_groups_of_a_type_marker():
  recon = fl.reconstruction.from_variable_model(
    LinearRegression(), local=nnx.Any(UserParam, UserOffset)
  )
  assert set(_present(recon.global_trainable_variables)) == {('w',)}
  assert set(_present(recon.global_non_trainable_variables)) == {('c',)}
  assert set(_present(recon.local_trainable_variables)) == {('b',)}
  assert set(_present(recon.local_non_trainable_variables)) == {('d',)}


@pytest.mark.parametrize('joint', [False, True])
def test_fed_recon_equals_numpy(joint):
  recon = fl.reconstruction.from_variable_model(LinearRegression(), local=(UserParam, UserOffset))
  process = fl.reconstruction.build_fed_recon(
    recon,
    server_optimizer=fl.optimizers.build_sgdm(0.7),
    client_optimizer=fl.optimizers.build_sgdm(0.05),
    reconstruction_optimizer=fl.optimizers.build_sgdm(0.2),
    jointly_train_variables=joint,
  )
  state = process.initialize()
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64)
  for round_num in range(3):
    cb = recon_ref._client_batches(round_num)
    state, metrics = process.next(state, cb)
    w, expected = recon_ref._numpy_round(w, cb, 0.2, 0.05, 0.7, joint)
    np.testing.assert_allclose(state.global_model_weights.trainable['w'], w, atol=1e-5)
    train = metrics['client_work']['train']
    assert int(train['num_examples']) == expected['num_examples']
    np.testing.assert_allclose(float(train['loss']), expected['loss'], rtol=1e-5)
    np.testing.assert_allclose(float(train['mse']), expected['loss'], rtol=1e-5)
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(state)]
  for name in ('b', 'd', 'squared_error', 'num_examples'):
    assert not [p for p in paths if f"['{name}']" in p], name


def test_fed_recon_eval_equals_numpy():
  recon = fl.reconstruction.from_variable_model(LinearRegression(), local=(UserParam, UserOffset))
  evaluation = fl.reconstruction.build_fed_recon_eval(
    recon, reconstruction_optimizer=fl.optimizers.build_sgdm(0.3)
  )
  state = evaluation.initialize()
  w = np.asarray(state.global_model_weights.trainable['w'], np.float64)
  cb = recon_ref._client_batches(1)
  _, metrics = evaluation.next(state, cb)
  loss, n = recon_ref._numpy_eval(w, cb, 0.3)
  current = metrics['client_work']['eval']['current_round_metrics']
  np.testing.assert_allclose(float(current['mse']), loss, rtol=1e-5)
  assert int(current['num_examples']) == n


def test_local_marker_matching_nothing_is_refused():
  with pytest.raises(ValueError, match='matches no weight'):
    fl.reconstruction.from_variable_model(LinearRegression(), local=nnx.PathContains('user'))


class WithBatchNorm(LinearRegression):
  """Predictions through a BatchNorm in training mode: one example at a time it outputs 0."""

  def __init__(self):
    super().__init__()
    self.bn = nnx.BatchNorm(1, rngs=nnx.Rngs(0))

  def forward_pass(self, batch, training=True):
    out = super().forward_pass(batch, training)
    predictions = self.bn(out.predictions[:, None])[:, 0]
    loss = fl.models.mean_squared_error(predictions, batch['y'])
    return out._replace(predictions=predictions, loss=loss)


def test_a_batch_norm_in_training_mode_is_refused():
  with pytest.raises(ValueError, match=r'WithBatchNorm\.bn is a BatchNorm .*batch statistics'):
    fl.reconstruction.from_variable_model(WithBatchNorm(), local=(UserParam, UserOffset))


def test_a_module_called_before_wrapping_evaluates_as_a_fresh_one():
  """The call's squared error and count stay out of every client's metrics."""
  called = LinearRegression()
  cb = recon_ref._client_batches(1)
  called.forward_pass(jax.tree.map(lambda x: x[0, 0], cb.batch))
  assert float(called.num_examples[...]) > 0
  metrics = []
  for module in (called, LinearRegression()):
    recon = fl.reconstruction.from_variable_model(module, local=(UserParam, UserOffset))
    evaluation = fl.reconstruction.build_fed_recon_eval(
      recon, reconstruction_optimizer=fl.optimizers.build_sgdm(0.3)
    )
    metrics.append(evaluation.next(evaluation.initialize(), cb)[1])
  jax.tree.map(np.testing.assert_array_equal, *metrics)
