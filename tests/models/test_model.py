"""FunctionalModel's construction checks, forward_pass, and the masked losses of fl.models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite.templates._client_work import masked_batch

FEATURES, CLASSES = 4, 3
INPUT_SPEC = {
  'x': jax.ShapeDtypeStruct((None, FEATURES), jnp.float32),
  'y': jax.ShapeDtypeStruct((None,), jnp.int32),
}
REGRESSION_SPEC = {
  'x': jax.ShapeDtypeStruct((None, FEATURES), jnp.float32),
  'y': jax.ShapeDtypeStruct((None, CLASSES), jnp.float32),
}


def linear_predict(weights, x, training=True):
  del training
  return x @ weights.trainable['w'] + weights.trainable['b']


def linear_weights(seed=0):
  rng = np.random.default_rng(seed)
  return fl.ModelWeights(
    {
      'w': rng.standard_normal((FEATURES, CLASSES)).astype(np.float32),
      'b': rng.standard_normal((CLASSES,)).astype(np.float32),
    },
    (),
  )


def linear_model(loss_fn=fl.models.softmax_cross_entropy, input_spec=INPUT_SPEC, **kwargs):
  return fl.FunctionalModel(
    initial_weights=linear_weights(),
    predict_on_batch_fn=linear_predict,
    loss_fn=loss_fn,
    input_spec=input_spec,
    **kwargs,
  )


# numpy references


def np_log_softmax(logits):
  z = logits - logits.max(axis=-1, keepdims=True)
  return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def np_cross_entropy(logits, labels, mask):
  """(loss, d loss / d logits) of the mask-weighted mean sparse cross-entropy, in float64."""
  logits = np.asarray(logits, np.float64)
  real = mask > 0
  n = real.sum()
  if n == 0:
    return 0.0, np.zeros_like(logits)
  log_p = np_log_softmax(logits[real])
  onehot = np.eye(logits.shape[1])[labels[real]]
  loss = -(log_p * onehot).sum() / n
  grad = np.zeros_like(logits)
  grad[real] = (np.exp(log_p) - onehot) / n
  return loss, grad


def np_squared_error(predictions, labels, mask):
  """(loss, d loss / d predictions) of the mask-weighted mean of per-example mean squares."""
  predictions = np.asarray(predictions, np.float64)
  real = mask > 0
  n = real.sum()
  if n == 0:
    return 0.0, np.zeros_like(predictions)
  diff = predictions[real] - labels[real]
  loss = (diff**2).mean(axis=1).sum() / n
  grad = np.zeros_like(predictions)
  grad[real] = 2 * diff / diff.shape[1] / n
  return loss, grad


def np_linear_grads(x, weights, grad_predictions, mask):
  """d loss / d (w, b) of `x @ w + b`, only the real rows of `x` taking part."""
  x = np.where(mask[:, None] > 0, x, 0.0).astype(np.float64)
  del weights
  return {'w': x.T @ grad_predictions, 'b': grad_predictions.sum(axis=0)}


# Construction checks


def _build(**overrides):
  kwargs = {
    'initial_weights': linear_weights(),
    'predict_on_batch_fn': linear_predict,
    'loss_fn': fl.models.softmax_cross_entropy,
    'input_spec': INPUT_SPEC,
  }
  kwargs.update(overrides)
  return fl.FunctionalModel(**kwargs)


@pytest.mark.parametrize(
  'transform',
  [jax.jit, jax.vmap, jax.grad],
  ids=['jit', 'vmap', 'grad'],
)
def test_rejects_tracer_initial_weights(transform):
  def build_inside(w):
    _build(initial_weights=fl.ModelWeights({'w': w}, ()))
    return jnp.sum(w)

  with pytest.raises(TypeError, match=r"initial_weights leaf .*\['w'\] is a JAX tracer"):
    transform(build_inside)(jnp.ones((FEATURES,)))


@pytest.mark.parametrize(
  'initial_weights, expected',
  [
    ({'w': np.zeros(3)}, 'initial_weights must be ModelWeights'),
    (({'w': np.zeros(3)},), 'initial_weights must be ModelWeights'),
    (fl.ModelWeights({'w': 'zeros'}, ()), r"initial_weights leaf .*\['w'\] is a str"),
  ],
  ids=['dict', '1_tuple', 'string_leaf'],
)
def test_rejects_bad_initial_weights(initial_weights, expected):
  with pytest.raises(TypeError, match=expected):
    _build(initial_weights=initial_weights)


@pytest.mark.parametrize('name', ['predict_on_batch_fn', 'loss_fn', 'forward_pass_fn'])
@pytest.mark.parametrize('value', [3, 'predict', np.zeros(2)], ids=['int', 'str', 'array'])
def test_rejects_non_callable_fns(name, value):
  with pytest.raises(TypeError, match=f'{name} must be callable'):
    _build(**{name: value})


@pytest.mark.parametrize(
  'metrics_fns',
  [
    (lambda: 0, lambda s, *a: s),
    (lambda: 0, 'update', lambda s: s),
  ],
  ids=['pair', 'non_callable'],
)
def test_rejects_bad_metrics_fns(metrics_fns):
  with pytest.raises(TypeError, match='metrics_fns must be a triple of callables'):
    _build(metrics_fns=metrics_fns)


@pytest.mark.parametrize(
  'bad_leaf',
  [np.zeros((2, FEATURES), np.float32), (None, FEATURES), jnp.float32],
  ids=['array', 'shape_tuple', 'dtype'],
)
def test_rejects_input_spec_leaf_not_shape_dtype_struct(bad_leaf):
  with pytest.raises(TypeError, match=r"input_spec leaf \['x'\].*expected jax.ShapeDtypeStruct"):
    _build(input_spec={**INPUT_SPEC, 'x': bad_leaf})


@pytest.mark.parametrize(
  'input_spec',
  [
    {'features': INPUT_SPEC['x'], 'label': INPUT_SPEC['y']},
    {'x': INPUT_SPEC['x']},
    {**INPUT_SPEC, 'w': INPUT_SPEC['y']},
  ],
  ids=['renamed', 'no_y', 'extra_key'],
)
def test_rejects_input_spec_without_exactly_x_and_y(input_spec):
  with pytest.raises(ValueError, match="exactly the keys 'x' and 'y'"):
    _build(input_spec=input_spec)


@pytest.mark.parametrize(
  'input_spec',
  [INPUT_SPEC['x'], (INPUT_SPEC['x'],), (INPUT_SPEC['x'], INPUT_SPEC['y'], INPUT_SPEC['y'])],
  ids=['single_leaf', '1_tuple', '3_tuple'],
)
def test_rejects_input_spec_that_is_not_a_batch(input_spec):
  with pytest.raises(TypeError, match=r"mapping \{'x': \.\.\., 'y': \.\.\.\} or a tuple \(x, y\)"):
    _build(input_spec=input_spec)


def test_accepts_tuple_input_spec_and_array_like_weights():
  model = _build(
    input_spec=(INPUT_SPEC['x'], INPUT_SPEC['y']),
    initial_weights=({'w': np.ones((FEATURES, CLASSES)), 'b': 0.5}, {'steps': 3}),
  )
  weights = model.initial_weights
  assert isinstance(weights, fl.ModelWeights)
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(weights))
  np.testing.assert_array_equal(weights.trainable['b'], 0.5)


# Methods


def test_forward_pass_equals_predict_on_batch_then_loss():
  model = linear_model()
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, FEATURES)).astype(np.float32)
  y = rng.integers(0, CLASSES, 6).astype(np.int32)
  weights = model.initial_weights

  output = jax.jit(model.forward_pass)(weights, {'x': x, 'y': y})
  assert isinstance(output, fl.BatchOutput)

  predictions = model.predict_on_batch(weights, x)
  np.testing.assert_array_equal(output.predictions, predictions)
  np.testing.assert_allclose(output.loss, model.loss(predictions, y), rtol=1e-6)
  assert int(output.num_examples) == 6
  # Against numpy, with nothing from the code under test.
  w, b = (np.asarray(weights.trainable[k], np.float64) for k in ('w', 'b'))
  np.testing.assert_allclose(output.predictions, x @ w + b, rtol=1e-5, atol=1e-6)
  expected_loss, _ = np_cross_entropy(x @ w + b, y, np.ones(6))
  np.testing.assert_allclose(output.loss, expected_loss, rtol=1e-5)


def test_forward_pass_accepts_tuple_batch():
  model = linear_model()
  x = np.ones((2, FEATURES), np.float32)
  y = np.zeros((2,), np.int32)
  a = model.forward_pass(model.initial_weights, (x, y))
  b = model.forward_pass(model.initial_weights, {'x': x, 'y': y})
  np.testing.assert_array_equal(a.loss, b.loss)


def test_forward_pass_uses_forward_pass_fn_when_given():
  def forward_pass_fn(weights, batch, training=True):
    del weights, training
    return fl.BatchOutput(batch['x'], jnp.float32(42.0), jnp.int32(7))

  model = linear_model(forward_pass_fn=forward_pass_fn)
  out = model.forward_pass(model.initial_weights, {'x': np.ones((2, FEATURES)), 'y': np.zeros(2)})
  assert float(out.loss) == 42.0 and int(out.num_examples) == 7


def test_rng_is_passed_only_to_predict_fns_that_take_it():
  seen = {}

  def predict_with_rng(weights, x, training=True, rng=None):
    seen['rng'] = rng
    return linear_predict(weights, x, training)

  assert not linear_model().uses_rng
  model = fl.FunctionalModel(
    initial_weights=linear_weights(),
    predict_on_batch_fn=predict_with_rng,
    loss_fn=fl.models.softmax_cross_entropy,
    input_spec=INPUT_SPEC,
  )
  assert model.uses_rng
  key = jax.random.PRNGKey(3)
  model.predict_on_batch(model.initial_weights, np.ones((1, FEATURES), np.float32), True, rng=key)
  np.testing.assert_array_equal(seen['rng'], key)


def test_metrics_default_to_empty():
  model = linear_model()
  state = model.initialize_metrics_state()
  out = model.forward_pass(model.initial_weights, {'x': np.ones((2, FEATURES)), 'y': np.zeros(2)})
  state = model.update_metrics_state(state, np.zeros(2), out, np.ones(2))
  assert model.finalize_metrics(state) == {}


def test_metrics_fns_are_used():
  metrics_fns = fl.metrics.create_functional_metric_fns(
    {'accuracy': fl.metrics.sparse_categorical_accuracy()}
  )
  model = linear_model(metrics_fns=metrics_fns)
  predictions = np.array([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]], np.float32)
  labels = np.array([1, 1, 2], np.int32)
  out = fl.BatchOutput(predictions, jnp.float32(0.0), jnp.int32(3))
  state = model.update_metrics_state(model.initialize_metrics_state(), labels, out, np.ones(3))
  np.testing.assert_allclose(model.finalize_metrics(state)['accuracy'], 2 / 3, rtol=1e-6)


# Masked losses

MASKS = {
  'mixed': np.array([1, 0, 1, 1, 0, 0], np.float32),
  'all_real': np.ones(6, np.float32),
  'one_real': np.array([0, 0, 0, 0, 0, 1], np.float32),
  'all_padding': np.zeros(6, np.float32),
}
JUNK = np.array([np.nan, np.inf, -np.inf, 1e30, np.nan, -1e30], np.float32)


def _with_junk(values, mask):
  """`values` with every padded row overwritten by NaN / inf / huge junk."""
  values = np.array(values)
  for i in np.flatnonzero(mask == 0):
    values[i] = JUNK[i]
  return values


@pytest.mark.parametrize('mask_name', list(MASKS))
def test_softmax_cross_entropy_ignores_junk_in_padded_rows(mask_name):
  mask = MASKS[mask_name]
  rng = np.random.default_rng(2)
  logits = _with_junk(rng.standard_normal((6, CLASSES)).astype(np.float32), mask)
  labels = rng.integers(0, CLASSES, 6).astype(np.int32)
  labels[mask == 0] = [-7, 10**6, 3, -1, 99, 5][: int((mask == 0).sum())]  # out of range junk

  loss = jax.jit(fl.models.softmax_cross_entropy)(logits, labels, mask)
  expected, _ = np_cross_entropy(logits, labels, mask)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('mask_name', list(MASKS))
def test_mean_squared_error_ignores_junk_in_padded_rows(mask_name):
  mask = MASKS[mask_name]
  rng = np.random.default_rng(3)
  predictions = _with_junk(rng.standard_normal((6, CLASSES)).astype(np.float32), mask)
  labels = _with_junk(rng.standard_normal((6, CLASSES)).astype(np.float32), mask)[:, ::-1].copy()

  loss = jax.jit(fl.models.mean_squared_error)(predictions, labels, mask)
  expected, _ = np_squared_error(predictions, labels, mask)
  assert np.isfinite(loss)
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-7)


def test_losses_without_sample_weight_are_plain_means():
  rng = np.random.default_rng(4)
  logits = rng.standard_normal((5, CLASSES)).astype(np.float32)
  labels = rng.integers(0, CLASSES, 5)
  targets = rng.standard_normal((5, CLASSES)).astype(np.float32)
  ones = np.ones(5)
  np.testing.assert_allclose(
    fl.models.softmax_cross_entropy(logits, labels), np_cross_entropy(logits, labels, ones)[0], 1e-5
  )
  np.testing.assert_allclose(
    fl.models.mean_squared_error(logits, targets), np_squared_error(logits, targets, ones)[0], 1e-5
  )


def test_mean_squared_error_averages_non_batch_dims_first():
  predictions = np.zeros((2, 2, 3), np.float32)
  labels = np.ones((2, 2, 3), np.float32)
  labels[1] = 3.0
  # per example: 1 and 9; weighted by [1, 3] -> (1 + 27) / 4.
  loss = fl.models.mean_squared_error(predictions, labels, np.array([1.0, 3.0]))
  np.testing.assert_allclose(loss, 7.0, rtol=1e-6)


@pytest.mark.parametrize('mask_name', list(MASKS))
@pytest.mark.parametrize('loss_name', ['softmax_cross_entropy', 'mean_squared_error'])
def test_loss_gradient_ignores_junk_inputs_masked_by_masked_batch(loss_name, mask_name):
  """The gradient wrt the weights is the gradient over the real rows alone (numpy, by hand)."""
  mask = MASKS[mask_name]
  rng = np.random.default_rng(5)
  x = _with_junk(rng.standard_normal((6, FEATURES)).astype(np.float32), mask)
  if loss_name == 'softmax_cross_entropy':
    y = rng.integers(0, CLASSES, 6).astype(np.int32)
    y[mask == 0] = 10**6
    reference = np_cross_entropy
  else:
    y = _with_junk(rng.standard_normal((6, CLASSES)).astype(np.float32), mask)
    reference = np_squared_error
  loss_fn = getattr(fl.models, loss_name)
  weights = linear_weights(seed=6)

  @jax.jit
  def loss_and_grad(trainable, batch, mask):
    def loss(trainable):
      x, y = fl.models.split_batch(masked_batch(batch, mask))
      predictions = linear_predict(fl.ModelWeights(trainable, ()), x)
      return loss_fn(predictions, y, mask)

    return jax.value_and_grad(loss)(trainable)

  loss, grads = loss_and_grad(weights.trainable, {'x': x, 'y': y}, mask)

  w, b = (np.asarray(weights.trainable[k], np.float64) for k in ('w', 'b'))
  safe_x = np.where(mask[:, None] > 0, x, 0.0).astype(np.float64)
  expected_loss, grad_predictions = reference(safe_x @ w + b, y, mask)
  expected_grads = np_linear_grads(x, w, grad_predictions, mask)
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, atol=1e-7)
  for name in ('w', 'b'):
    np.testing.assert_allclose(grads[name], expected_grads[name], rtol=1e-4, atol=1e-6)


def test_masked_batch_zeroes_padded_rows_of_every_leaf():
  mask = np.array([1.0, 0.0, 1.0])
  batch = {
    'x': np.full((3, 2, 2), np.nan, np.float32),
    'y': np.array([4, -1, 5], np.int32),
  }
  batch['x'][0] = 1.0
  batch['x'][2] = 2.0
  out = masked_batch(batch, mask)
  np.testing.assert_array_equal(out['x'][1], np.zeros((2, 2)))
  np.testing.assert_array_equal(np.asarray(out['x'])[[0, 2]], batch['x'][[0, 2]])
  np.testing.assert_array_equal(out['y'], [4, 0, 5])
  assert out['y'].dtype == jnp.int32
