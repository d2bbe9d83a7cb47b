"""Functional metrics against numpy: padded examples count in none of them; states add up."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl
from fedjax_lite import metrics

CLASSES = 3
SETTINGS = settings(max_examples=12, deadline=None, derandomize=True, database=None)


def np_cross_entropy_per_example(logits, labels):
  z = logits - logits.max(axis=1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
  return -log_p[np.arange(len(labels)), labels]


def make_batches(seed, masks, num_outputs=CLASSES, regression=False):
  """Batches with junk (NaN, inf, out-of-range labels) in every padded example."""
  rng = np.random.default_rng(seed)
  batches = []
  for mask in masks:
    mask = np.asarray(mask, np.float32)
    n = len(mask)
    predictions = rng.standard_normal((n, num_outputs)).astype(np.float32)
    if regression:
      labels = rng.standard_normal((n, num_outputs)).astype(np.float32)
      labels[mask == 0] = np.inf
    else:
      labels = rng.integers(0, num_outputs, n).astype(np.int32)
      labels[mask == 0] = -12345
    predictions[mask == 0] = np.nan
    batches.append((predictions, labels, mask))
  return batches


def batch_output(predictions, labels, mask):
  """What client work reports for a padded batch: loss over real rows, real example count."""
  real = mask > 0
  n = int(real.sum())
  loss = 0.0
  if n and np.issubdtype(labels.dtype, np.integer):
    loss = np_cross_entropy_per_example(predictions[real], labels[real]).mean()
  return fl.BatchOutput(jnp.asarray(predictions), jnp.float32(loss), jnp.int32(n))


def run_metric(metric, batches, with_mask=True):
  state = metric.initialize()
  update = metric.update
  for predictions, labels, mask in batches:
    state = update(
      state, labels, batch_output(predictions, labels, mask), mask if with_mask else None
    )
  return metric.finalize(state), state


def pooled(batches):
  """Real examples of all batches, concatenated."""
  real = [m > 0 for _, _, m in batches]
  predictions = np.concatenate([p[r] for (p, _, _), r in zip(batches, real, strict=True)])
  labels = np.concatenate([y[r] for (_, y, _), r in zip(batches, real, strict=True)])
  return predictions, labels


masks_strategy = st.lists(
  st.lists(st.booleans(), min_size=1, max_size=6), min_size=1, max_size=3
).map(lambda masks: [np.asarray(m, np.float32) for m in masks])


# One composed, jitted triple per task, so hypothesis compiles once per batch size, not per metric.
CLASSIFICATION = metrics.create_functional_metric_fns(
  {
    'accuracy': metrics.sparse_categorical_accuracy(),
    'loss': metrics.loss(),
    'num_examples': metrics.num_examples(),
    'num_batches': metrics.num_batches(),
  }
)
REGRESSION = metrics.create_functional_metric_fns(
  {'mse': metrics.mean_squared_error(), 'mae': metrics.mean_absolute_error()}
)


def run_composed(fns, batches):
  initialize, update, finalize = fns
  state = initialize()
  for predictions, labels, mask in batches:
    state = _jitted_update(update)(state, labels, batch_output(predictions, labels, mask), mask)
  return finalize(state)


_JITTED = {}


def _jitted_update(update):
  return _JITTED.setdefault(update, jax.jit(update))


@SETTINGS
@given(masks=masks_strategy, seed=st.integers(0, 2**16))
def test_classification_metrics_match_numpy(masks, seed):
  batches = make_batches(seed, masks)
  predictions, labels = pooled(batches)
  n = len(labels)

  result = run_composed(CLASSIFICATION, batches)

  expected_accuracy = (predictions.argmax(1) == labels).mean() if n else 0.0
  expected_loss = np_cross_entropy_per_example(predictions, labels).mean() if n else 0.0
  np.testing.assert_allclose(result['accuracy'], expected_accuracy, rtol=1e-6)
  np.testing.assert_allclose(result['loss'], expected_loss, rtol=1e-5)
  assert int(result['num_examples']) == n and result['num_examples'].dtype == jnp.int32
  assert int(result['num_batches']) == sum(int(m.sum() > 0) for m in masks)
  assert result['num_batches'].dtype == jnp.int32


@SETTINGS
@given(masks=masks_strategy, seed=st.integers(0, 2**16), num_outputs=st.integers(1, 3))
def test_regression_metrics_match_numpy(masks, seed, num_outputs):
  batches = make_batches(seed, masks, num_outputs, regression=True)
  predictions, labels = pooled(batches)

  result = run_composed(REGRESSION, batches)

  diff = predictions.astype(np.float64) - labels
  expected_mse = (diff**2).mean(axis=1).mean() if len(diff) else 0.0
  expected_mae = np.abs(diff).mean(axis=1).mean() if len(diff) else 0.0
  np.testing.assert_allclose(result['mse'], expected_mse, rtol=1e-5)
  np.testing.assert_allclose(result['mae'], expected_mae, rtol=1e-5)


def test_metrics_without_sample_weight_count_every_example():
  batches = make_batches(0, [np.ones(4), np.ones(2)])
  predictions, labels = pooled(batches)
  accuracy, _ = run_metric(metrics.sparse_categorical_accuracy(), batches, with_mask=False)
  np.testing.assert_allclose(accuracy, (predictions.argmax(1) == labels).mean(), rtol=1e-6)
  reg = make_batches(1, [np.ones(5)], 2, regression=True)
  mse, _ = run_metric(metrics.mean_squared_error(), reg, with_mask=False)
  np.testing.assert_allclose(mse, ((reg[0][0] - reg[0][1]) ** 2).mean(), rtol=1e-5)


def test_a_batch_of_padding_changes_no_metric():
  real = make_batches(2, [np.array([1, 1, 0, 1], np.float32)])
  padding = make_batches(3, [np.zeros(4, np.float32)])
  for metric in (
    metrics.sparse_categorical_accuracy(),
    metrics.loss(),
    metrics.num_examples(),
    metrics.num_batches(),
  ):
    value, state = run_metric(metric, real)
    value_padded, state_padded = run_metric(metric, real + padding)
    np.testing.assert_array_equal(value_padded, value)
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(state_padded), strict=True):
      np.testing.assert_array_equal(a, b)


def test_metrics_of_nothing_are_zero_not_nan():
  padding = make_batches(4, [np.zeros(3, np.float32)])
  for metric in (metrics.sparse_categorical_accuracy(), metrics.loss()):
    value, _ = run_metric(metric, padding)
    assert float(value) == 0.0
  value, _ = run_metric(metrics.mean_squared_error(), make_batches(5, [np.zeros(2)], 2, True))
  assert float(value) == 0.0


def test_labels_are_reshaped_to_the_predictions():
  predictions = np.array([[1.0], [2.0], [4.0]], np.float32)
  labels = np.array([0.0, 0.0, 1.0], np.float32)  # [batch], predictions [batch, 1]
  out = fl.BatchOutput(predictions, jnp.float32(0), jnp.int32(3))
  mse = metrics.mean_squared_error()
  value = mse.finalize(mse.update(mse.initialize(), labels, out, np.ones(3)))
  np.testing.assert_allclose(value, (1 + 4 + 9) / 3, rtol=1e-6)
  accuracy = metrics.sparse_categorical_accuracy()
  logits = np.array([[0.0, 1.0], [1.0, 0.0]], np.float32)
  out = fl.BatchOutput(logits, jnp.float32(0), jnp.int32(2))
  state = accuracy.update(accuracy.initialize(), np.array([[1], [1]], np.int32), out, np.ones(2))
  np.testing.assert_allclose(accuracy.finalize(state), 0.5)


# create_functional_metric_fns


def test_create_functional_metric_fns_composes_named_metrics():
  named = {
    'accuracy': metrics.sparse_categorical_accuracy(),
    'loss': metrics.loss(),
    'num_examples': metrics.num_examples(),
    'num_batches': metrics.num_batches(),
  }
  initialize, update, finalize = metrics.create_functional_metric_fns(named)
  batches = make_batches(6, [np.array([1, 0, 1, 1]), np.array([0, 0, 0, 0]), np.array([1, 1])])

  state = initialize()
  assert set(state) == set(named)
  for predictions, labels, mask in batches:
    state = jax.jit(update)(state, labels, batch_output(predictions, labels, mask), mask)
  result = finalize(state)

  assert set(result) == set(named)
  for name, metric in named.items():
    alone, _ = run_metric(metric, batches)
    np.testing.assert_array_equal(result[name], alone)
  predictions, labels = pooled(batches)
  np.testing.assert_allclose(result['accuracy'], (predictions.argmax(1) == labels).mean(), 1e-6)
  assert int(result['num_examples']) == 5 and int(result['num_batches']) == 2


def test_create_functional_metric_fns_of_nothing():
  initialize, update, finalize = metrics.create_functional_metric_fns({})
  assert finalize(update(initialize(), None, None, None)) == {}


@pytest.mark.parametrize(
  'bad, expected',
  [
    ({'acc': (lambda: 0, lambda s, *a: s, lambda s: s)}, r"metrics\['acc'\] is a tuple"),
    ({'acc': metrics.sparse_categorical_accuracy}, r"metrics\['acc'\] is a function"),
    ({'ok': metrics.loss(), 'bad': 3}, r"metrics\['bad'\] is a int; expected FunctionalMetric"),
  ],
  ids=['plain_tuple', 'factory_not_called', 'int'],
)
def test_create_functional_metric_fns_rejects_non_functional_metrics(bad, expected):
  with pytest.raises(TypeError, match=expected):
    metrics.create_functional_metric_fns(bad)


def test_create_functional_metric_fns_rejects_non_mapping():
  with pytest.raises(TypeError, match='metrics must be a mapping'):
    metrics.create_functional_metric_fns([metrics.loss()])


# sum_then_finalize


def test_sum_then_finalize_equals_finalize_of_summed_states_and_pooled_numpy():
  initialize, update, finalize = metrics.create_functional_metric_fns(
    {
      'accuracy': metrics.sparse_categorical_accuracy(),
      'loss': metrics.loss(),
      'num_examples': metrics.num_examples(),
      'num_batches': metrics.num_batches(),
    }
  )
  client_masks = [
    [np.array([1, 1, 0]), np.array([1, 0, 0])],
    [np.array([0, 0, 0]), np.array([0, 0, 0])],  # a client with no data
    [np.array([1, 1, 1]), np.array([1, 1, 0])],
  ]
  client_batches = [make_batches(10 + i, m) for i, m in enumerate(client_masks)]

  client_states = []
  for batches in client_batches:
    state = initialize()
    for predictions, labels, mask in batches:
      state = update(state, labels, batch_output(predictions, labels, mask), mask)
    client_states.append(state)
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *client_states)

  aggregated = jax.jit(metrics.sum_then_finalize(finalize))(stacked)
  summed = jax.tree.map(lambda *xs: sum(xs), *client_states)
  expected = finalize(summed)
  assert set(aggregated) == set(expected)
  for name in expected:
    np.testing.assert_allclose(aggregated[name], expected[name], rtol=1e-6)

  # Pooled numpy over every real example of every client, not an average of client means.
  predictions, labels = pooled([b for batches in client_batches for b in batches])
  np.testing.assert_allclose(aggregated['accuracy'], (predictions.argmax(1) == labels).mean(), 1e-6)
  np.testing.assert_allclose(
    aggregated['loss'], np_cross_entropy_per_example(predictions, labels).mean(), rtol=1e-5
  )
  assert int(aggregated['num_examples']) == len(labels) == 8
  assert int(aggregated['num_batches']) == 4


def test_metric_states_add_across_clients_under_vmap():
  metric = metrics.sparse_categorical_accuracy()
  rng = np.random.default_rng(11)
  predictions = rng.standard_normal((4, 5, CLASSES)).astype(np.float32)
  labels = rng.integers(0, CLASSES, (4, 5)).astype(np.int32)
  mask = (rng.random((4, 5)) < 0.5).astype(np.float32)

  def client_state(p, y, m):
    return metric.update(metric.initialize(), y, fl.BatchOutput(p, 0.0, jnp.sum(m)), m)

  states = jax.vmap(client_state)(predictions, labels, mask)
  value = metrics.sum_then_finalize(metric.finalize)(states)
  real = mask > 0
  np.testing.assert_allclose(value, (predictions.argmax(-1) == labels)[real].mean(), rtol=1e-6)
