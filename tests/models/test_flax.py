"""from_flax: linen and nnx modules as FunctionalModels whose predictions equal the module's own."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen, nnx

import fedjax_lite as fl

FEATURES, HIDDEN, CLASSES, BATCH = 3, 16, 4, 6
INPUT_SPEC = {
  'x': jax.ShapeDtypeStruct((None, FEATURES), jnp.float32),
  'y': jax.ShapeDtypeStruct((None,), jnp.int32),
}
LOSS = fl.models.softmax_cross_entropy


def batch_x(seed=0, n=BATCH):
  return np.random.default_rng(seed).standard_normal((n, FEATURES)).astype(np.float32)


def assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def assert_close(a, b):
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


# linen


class LinenMLP(linen.Module):
  @linen.compact
  def __call__(self, x):
    x = linen.relu(linen.Dense(HIDDEN)(x))
    return linen.Dense(CLASSES)(x)


class LinenBatchNorm(linen.Module):
  @linen.compact
  def __call__(self, x, train: bool):
    x = linen.Dense(HIDDEN)(x)
    x = linen.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5)(x)
    return linen.Dense(CLASSES)(linen.relu(x))


class LinenDropout(linen.Module):
  @linen.compact
  def __call__(self, x, train: bool):
    x = linen.relu(linen.Dense(HIDDEN)(x))
    x = linen.Dropout(0.5, deterministic=not train)(x)
    return linen.Dense(CLASSES)(x)


def test_linen_mlp_params_are_trainable_and_predictions_equal_apply():
  module = LinenMLP()
  model = fl.models.from_flax(module, input_spec=INPUT_SPEC, loss_fn=LOSS, seed=3)
  variables = module.init(jax.random.PRNGKey(3), jnp.zeros((1, FEATURES)))

  weights = model.initial_weights
  assert isinstance(weights, fl.ModelWeights)
  assert_trees_equal(weights.trainable, variables['params'])
  assert jax.tree.leaves(weights.non_trainable) == []

  x = batch_x()
  expected = module.apply(variables, x)
  for training in (True, False):
    assert_close(model.predict_on_batch(weights, x, training), expected)
  assert_close(jax.jit(model.predict_on_batch, static_argnums=2)(weights, x, True), expected)
  # And the module really is the MLP numpy says it is.
  p = variables['params']
  h = np.maximum(x @ p['Dense_0']['kernel'] + p['Dense_0']['bias'], 0)
  np.testing.assert_allclose(
    model.predict_on_batch(weights, x), h @ p['Dense_1']['kernel'] + p['Dense_1']['bias'], 1e-5
  )


def test_linen_seed_controls_initial_weights():
  a = fl.models.from_flax(LinenMLP(), input_spec=INPUT_SPEC, loss_fn=LOSS, seed=0)
  b = fl.models.from_flax(LinenMLP(), input_spec=INPUT_SPEC, loss_fn=LOSS, seed=1)
  c = fl.models.from_flax(LinenMLP(), input_spec=INPUT_SPEC, loss_fn=LOSS, seed=0)
  assert_trees_equal(a.initial_weights, c.initial_weights)
  assert not np.array_equal(
    a.initial_weights.trainable['Dense_0']['kernel'],
    b.initial_weights.trainable['Dense_0']['kernel'],
  )


def _linen_batchnorm_model():
  module = LinenBatchNorm()
  model = fl.models.from_flax(module, input_spec=INPUT_SPEC, loss_fn=LOSS, training_arg='train')
  # Running statistics far from the batch's, so training and inference modes differ.
  rng = np.random.default_rng(7)
  stats = {
    'BatchNorm_0': {
      'mean': rng.standard_normal(HIDDEN).astype(np.float32),
      'var': rng.uniform(0.5, 2.0, HIDDEN).astype(np.float32),
    }
  }
  weights = model.initial_weights._replace(non_trainable={'batch_stats': stats})
  return module, model, weights


def test_linen_batchnorm_stats_are_non_trainable():
  module, model, _ = _linen_batchnorm_model()
  variables = module.init(jax.random.PRNGKey(0), jnp.zeros((1, FEATURES)), train=False)
  assert_trees_equal(model.initial_weights.trainable, variables['params'])
  assert_trees_equal(model.initial_weights.non_trainable, {'batch_stats': variables['batch_stats']})
  assert set(model.initial_weights.trainable['BatchNorm_0']) == {'scale', 'bias'}


def test_linen_batchnorm_inference_uses_running_stats():
  module, model, weights = _linen_batchnorm_model()
  x = batch_x(1)
  variables = {'params': weights.trainable, **weights.non_trainable}
  out = jax.jit(model.predict_on_batch, static_argnums=2)(weights, x, False)
  assert_close(out, module.apply(variables, x, train=False))

  # numpy: normalise with the running statistics held in the non-trainable weights.
  p, s = weights.trainable, weights.non_trainable['batch_stats']['BatchNorm_0']
  h = x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  h = (h - s['mean']) / np.sqrt(s['var'] + 1e-5) * p['BatchNorm_0']['scale']
  h = np.maximum(h + p['BatchNorm_0']['bias'], 0)
  np.testing.assert_allclose(out, h @ p['Dense_1']['kernel'] + p['Dense_1']['bias'], 1e-4, 1e-5)


def test_linen_batchnorm_training_uses_batch_stats_and_drops_their_update():
  module, model, weights = _linen_batchnorm_model()
  x = batch_x(2)
  variables = {'params': weights.trainable, **weights.non_trainable}
  expected, updates = module.apply(variables, x, train=True, mutable=['batch_stats'])
  before = jax.tree.map(np.array, weights)

  out = jax.jit(model.predict_on_batch, static_argnums=2)(weights, x, True)
  assert isinstance(out, jax.Array)  # the predictions alone, not (predictions, updates)
  assert_close(out, expected)
  assert not np.allclose(out, model.predict_on_batch(weights, x, False))
  # flax would have moved the running mean; the weights we passed in are untouched.
  assert not np.allclose(
    updates['batch_stats']['BatchNorm_0']['mean'],
    weights.non_trainable['batch_stats']['BatchNorm_0']['mean'],
  )
  assert_trees_equal(weights, before)

  # numpy: normalise with the batch's own (biased) statistics.
  p = weights.trainable
  h = x @ p['Dense_0']['kernel'] + p['Dense_0']['bias']
  h = (h - h.mean(0)) / np.sqrt(h.var(0) + 1e-5) * p['BatchNorm_0']['scale']
  h = np.maximum(h + p['BatchNorm_0']['bias'], 0)
  np.testing.assert_allclose(out, h @ p['Dense_1']['kernel'] + p['Dense_1']['bias'], 1e-4, 1e-5)


def test_linen_batchnorm_model_trains_with_grad():
  _, model, weights = _linen_batchnorm_model()
  x, y = batch_x(3), np.arange(BATCH, dtype=np.int32) % CLASSES

  def loss(trainable):
    w = weights._replace(trainable=trainable)
    return model.loss(model.predict_on_batch(w, x, True), y)

  grads = jax.jit(jax.grad(loss))(weights.trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(weights.trainable)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


def test_linen_dropout_uses_rng_as_the_dropout_stream():
  module = LinenDropout()
  model = fl.models.from_flax(module, input_spec=INPUT_SPEC, loss_fn=LOSS, training_arg='train')
  weights = model.initial_weights
  variables = {'params': weights.trainable}
  x = batch_x(4)
  assert model.uses_rng

  predict = jax.jit(model.predict_on_batch, static_argnums=2)
  key1, key2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  out1 = predict(weights, x, True, rng=key1)
  assert_close(out1, module.apply(variables, x, train=True, rngs={'dropout': key1}))
  assert_close(predict(weights, x, True, rng=key1), out1)  # same key, same mask
  out2 = predict(weights, x, True, rng=key2)
  assert_close(out2, module.apply(variables, x, train=True, rngs={'dropout': key2}))
  assert not np.allclose(out1, out2)
  # Inference is deterministic and needs no key.
  assert_close(predict(weights, x, False), module.apply(variables, x, train=False))


def test_from_flax_rejects_non_modules_and_training_arg_for_nnx():
  with pytest.raises(TypeError, match=r'module must be a flax linen\.Module or nnx\.Module'):
    fl.models.from_flax(lambda x: x, input_spec=INPUT_SPEC, loss_fn=LOSS)
  with pytest.raises(ValueError, match='training_arg applies to linen modules'):
    fl.models.from_flax(
      nnx.Linear(FEATURES, CLASSES, rngs=nnx.Rngs(0)),
      input_spec=INPUT_SPEC,
      loss_fn=LOSS,
      training_arg='train',
    )


# nnx


class NnxBatchNormNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.norm = nnx.BatchNorm(HIDDEN, momentum=0.9, epsilon=1e-5, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def __call__(self, x):
    return self.out(nnx.relu(self.norm(self.dense(x))))


class NnxDropoutNet(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(FEATURES, HIDDEN, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.out = nnx.Linear(HIDDEN, CLASSES, rngs=rngs)

  def hidden(self, x):
    return nnx.relu(self.dense(x))

  def __call__(self, x):
    return self.out(self.dropout(self.hidden(x)))


def _nnx_batchnorm_net():
  net = NnxBatchNormNet(nnx.Rngs(0))
  rng = np.random.default_rng(8)
  net.norm.mean[...] = jnp.asarray(rng.standard_normal(HIDDEN), jnp.float32)
  net.norm.var[...] = jnp.asarray(rng.uniform(0.5, 2.0, HIDDEN), jnp.float32)
  return net


def test_nnx_params_are_trainable_everything_else_non_trainable():
  net = _nnx_batchnorm_net()
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  weights = model.initial_weights
  assert_trees_equal(weights.trainable, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
  assert_trees_equal(weights.non_trainable, nnx.to_pure_dict(nnx.state(net, nnx.Not(nnx.Param))))
  assert set(weights.trainable) == {'dense', 'norm', 'out'}
  assert set(weights.trainable['norm']) == {'scale', 'bias'}
  assert set(weights.non_trainable) == {'norm'}
  assert set(weights.non_trainable['norm']) == {'mean', 'var'}
  np.testing.assert_array_equal(weights.non_trainable['norm']['mean'], net.norm.mean[...])


@pytest.mark.parametrize('training', [False, True], ids=['eval', 'train'])
def test_nnx_batchnorm_predictions_equal_the_module_call(training):
  net = _nnx_batchnorm_net()
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  before = nnx.to_pure_dict(nnx.state(net))
  x = batch_x(5)

  reference = nnx.clone(net)
  reference.train() if training else reference.eval()
  expected = reference(x)

  out = jax.jit(model.predict_on_batch, static_argnums=2)(model.initial_weights, x, training)
  assert_close(out, expected)
  assert_close(model.predict_on_batch(model.initial_weights, x, training), expected)
  # The adapter neither updates the wrapped module's statistics nor the weights it was given.
  assert_trees_equal(nnx.to_pure_dict(nnx.state(net)), before)


def test_nnx_predictions_follow_the_weights_passed_in():
  net = _nnx_batchnorm_net()
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  weights = model.initial_weights
  new_trainable = jax.tree.map(lambda w: w * 0.5 + 0.1, weights.trainable)
  new_stats = jax.tree.map(lambda s: s + 1.0, weights.non_trainable)
  x = batch_x(6)

  reference = nnx.clone(net)
  nnx.update(reference, nnx.State(new_trainable), nnx.State(new_stats))
  reference.eval()
  out = model.predict_on_batch(fl.ModelWeights(new_trainable, new_stats), x, False)
  assert_close(out, reference(x))
  assert not np.allclose(out, model.predict_on_batch(weights, x, False))


def test_nnx_model_trains_with_grad():
  net = _nnx_batchnorm_net()
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  weights = model.initial_weights
  x, y = batch_x(7), np.arange(BATCH, dtype=np.int32) % CLASSES

  def loss(trainable):
    w = weights._replace(trainable=trainable)
    return model.loss(model.predict_on_batch(w, x, True), y)

  grads = jax.jit(jax.grad(loss))(weights.trainable)
  assert jax.tree.structure(grads) == jax.tree.structure(weights.trainable)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))


NNX_RNGS = {
  'default_stream': lambda: nnx.Rngs(0),  # the form flax's own examples use
  'dropout_stream': lambda: nnx.Rngs(params=0, dropout=1),
}


@pytest.mark.parametrize('make_rngs', list(NNX_RNGS.values()), ids=list(NNX_RNGS))
def test_nnx_dropout_eval_equals_the_module_call(make_rngs):
  net = NnxDropoutNet(make_rngs())
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  x = batch_x(8)
  reference = nnx.clone(net)
  reference.eval()
  assert_close(model.predict_on_batch(model.initial_weights, x, False), reference(x))
  assert_close(
    model.predict_on_batch(model.initial_weights, x, False, rng=jax.random.PRNGKey(9)),
    reference(x),
  )


@pytest.mark.parametrize('make_rngs', list(NNX_RNGS.values()), ids=list(NNX_RNGS))
def test_nnx_dropout_uses_rng_as_the_dropout_stream(make_rngs):
  """`rng` feeds the 'dropout' stream (from_flax's docstring): new key, new dropout mask."""
  net = NnxDropoutNet(make_rngs())
  model = fl.models.from_flax(net, input_spec=INPUT_SPEC, loss_fn=LOSS)
  weights = model.initial_weights
  x = batch_x(10, n=32)
  assert model.uses_rng

  predict = jax.jit(lambda w, rng: model.predict_on_batch(w, x, True, rng=rng))
  key1, key2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  out1 = predict(weights, key1)
  assert_close(predict(weights, key1), out1)
  assert_close(model.predict_on_batch(weights, x, True, rng=key1), out1)

  # Each kept unit is scaled by 1 / (1 - rate); a dropped one is 0. Check on the hidden layer
  # through a module whose output layer is the identity.
  probe = NnxDropoutNet(make_rngs())
  probe.out = nnx.Linear(HIDDEN, HIDDEN, use_bias=False, rngs=nnx.Rngs(0))
  probe.out.kernel[...] = jnp.eye(HIDDEN)
  probe_model = fl.models.from_flax(probe, input_spec=INPUT_SPEC, loss_fn=LOSS)
  pw = probe_model.initial_weights
  hidden = np.asarray(probe.hidden(x))
  dropped = [np.asarray(probe_model.predict_on_batch(pw, x, True, rng=k)) for k in (key1, key2)]
  for d in dropped:
    kept = d != 0
    np.testing.assert_allclose(d[kept], 2 * hidden[kept], rtol=1e-5)
    assert 0.3 < kept[hidden != 0].mean() < 0.7
  # Different keys must drop different units.
  assert not np.array_equal(dropped[0] != 0, dropped[1] != 0), (
    'two rng keys gave the same dropout mask: rng does not reach the dropout stream'
  )
  assert not np.allclose(out1, predict(weights, key2))
