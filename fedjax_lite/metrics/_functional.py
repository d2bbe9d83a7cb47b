"""Functional metrics: `(initialize, update, finalize)` triples whose states add across clients.

Every state is a pytree of sums, so the state of a cohort is the sum of its clients' states and
finalizing after summing (`sum_then_finalize`) is exact. `update(state, labels, batch_output,
sample_weight)` takes the padding mask `[batch_size]` as `sample_weight`: masked examples count in
nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class FunctionalMetric(NamedTuple):
  """One metric as pure functions.

  Attributes:
    initialize: `() -> state`, the additive zero.
    update: `(state, labels, batch_output, sample_weight=None) -> state`.
    finalize: `(state) -> value`.
  """

  initialize: Callable[[], Any]
  update: Callable[..., Any]
  finalize: Callable[[Any], Any]


def _weights(sample_weight: jax.Array | None, batch_size: int) -> jax.Array:
  if sample_weight is None:
    return jnp.ones((batch_size,), jnp.float32)
  return sample_weight.astype(jnp.float32)


def _safe_divide(total: jax.Array, count: jax.Array) -> jax.Array:
  return total / jnp.where(count > 0, count, 1)


def _sum_and_count() -> dict:
  return {'total': jnp.zeros((), jnp.float32), 'count': jnp.zeros((), jnp.float32)}


def _mean_of(state: dict) -> jax.Array:
  return _safe_divide(state['total'], state['count'])


def _per_example_mean(per_example_fn: Callable) -> FunctionalMetric:
  """A metric that averages `per_example_fn(predictions, labels) -> [batch_size]`."""

  def update(state, labels, batch_output, sample_weight=None):
    values = per_example_fn(batch_output.predictions, labels).astype(jnp.float32)
    w = _weights(sample_weight, values.shape[0])
    values = jnp.where(w > 0, values, 0)
    return {'total': state['total'] + jnp.sum(values * w), 'count': state['count'] + jnp.sum(w)}

  return FunctionalMetric(_sum_and_count, update, _mean_of)


def _flatten_error(predictions, labels):
  diff = predictions - jnp.reshape(labels, predictions.shape).astype(predictions.dtype)
  return jnp.reshape(diff, (diff.shape[0], -1))


def sparse_categorical_accuracy() -> FunctionalMetric:
  """Fraction of real examples whose argmax prediction equals the integer label."""
  return _per_example_mean(
    lambda predictions, labels: jnp.argmax(predictions, axis=-1) == jnp.reshape(labels, (-1,))
  )


def mean_squared_error() -> FunctionalMetric:
  """Squared error, averaged over non-batch dimensions then over real examples."""
  return _per_example_mean(lambda p, y: jnp.mean(_flatten_error(p, y) ** 2, axis=1))


def mean_absolute_error() -> FunctionalMetric:
  """Absolute error, averaged over non-batch dimensions then over real examples."""
  return _per_example_mean(lambda p, y: jnp.mean(jnp.abs(_flatten_error(p, y)), axis=1))


def loss() -> FunctionalMetric:
  """The batch loss averaged over real examples (each batch weighted by its real examples)."""

  def update(state, labels, batch_output, sample_weight=None):
    del labels, sample_weight  # batch_output.num_examples already counts only real examples.
    n = jnp.asarray(batch_output.num_examples, jnp.float32)
    value = jnp.where(n > 0, batch_output.loss, 0).astype(jnp.float32)
    return {'total': state['total'] + value * n, 'count': state['count'] + n}

  return FunctionalMetric(_sum_and_count, update, _mean_of)


def num_examples() -> FunctionalMetric:
  """The number of real examples seen (int32)."""

  def update(state, labels, batch_output, sample_weight=None):
    del labels, sample_weight
    return state + jnp.asarray(batch_output.num_examples, jnp.int32)

  return FunctionalMetric(lambda: jnp.zeros((), jnp.int32), update, lambda state: state)


def num_batches() -> FunctionalMetric:
  """The number of batches holding at least one real example (int32)."""

  def update(state, labels, batch_output, sample_weight=None):
    del labels, sample_weight
    return state + (jnp.asarray(batch_output.num_examples) > 0).astype(jnp.int32)

  return FunctionalMetric(lambda: jnp.zeros((), jnp.int32), update, lambda state: state)


def create_functional_metric_fns(
  metrics: Mapping[str, FunctionalMetric],
) -> tuple[Callable, Callable, Callable]:
  """Combines named metrics into one `(initialize, update, finalize)` triple.

  Example:
    >>> initialize, update, finalize = create_functional_metric_fns(
    ...     {'accuracy': sparse_categorical_accuracy(), 'num_examples': num_examples()})

  Args:
    metrics: name -> `FunctionalMetric`.

  Returns:
    The triple `FunctionalModel(metrics_fns=...)` takes; states and results are dicts keyed by
    the metric names.
  """
  if not isinstance(metrics, Mapping):
    raise TypeError(f'metrics must be a mapping of name -> FunctionalMetric; got {metrics!r}')
  for name, metric in metrics.items():
    if not isinstance(metric, FunctionalMetric):
      raise TypeError(
        f"metrics['{name}'] is a {type(metric).__name__}; expected FunctionalMetric "
        '(e.g. fl.metrics.sparse_categorical_accuracy())'
      )
  metrics = dict(metrics)

  def initialize():
    return {name: m.initialize() for name, m in metrics.items()}

  def update(state, labels, batch_output, sample_weight=None):
    return {
      name: m.update(state[name], labels, batch_output, sample_weight)
      for name, m in metrics.items()
    }

  def finalize(state):
    return {name: m.finalize(state[name]) for name, m in metrics.items()}

  return initialize, update, finalize
