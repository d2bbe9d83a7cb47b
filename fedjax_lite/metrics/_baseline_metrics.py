"""The metrics of TFF's baseline tasks (`tff.simulation.baselines`), as `FunctionalMetric`s.

- next-token tasks: `num_tokens` and `masked_token_accuracy`, TFF's `NumTokensCounter` and
  `MaskedCategoricalAccuracy` (keras_metrics.py): tokens whose label is one of `masked_ids` count
  in neither;
- multi-label tags: `precision` and `recall_at_k`, Keras's `Precision()` and
  `Recall(top_k=k)` (`precision`: a prediction is positive above `threshold`; `recall_at_k`: a
  prediction is positive when it is among its example's `k` highest, whatever its score, as
  Keras's `top_k` sets the threshold to -inf).

Each takes the padding mask `[batch_size]` as `sample_weight`: padded examples count in nothing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from fedjax_lite.metrics import _functional


def _token_weights(labels: jax.Array, sample_weight, masked_ids: Sequence[int]) -> jax.Array:
  """`[batch_size, L]` float32: the example's weight, 0 where the label is a masked id."""
  w = jnp.ones(labels.shape, jnp.float32)
  if sample_weight is not None:
    sw = sample_weight.astype(jnp.float32)
    w = w * jnp.reshape(sw, sw.shape + (1,) * (labels.ndim - 1))
  for token in masked_ids:
    w = w * (labels != token)
  return w


def _check_ids(masked_ids) -> tuple[int, ...]:
  ids = tuple(masked_ids)
  if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
    raise TypeError(f'masked_ids must be ints; got {masked_ids!r}')
  return ids


def masked_token_accuracy(masked_ids: Sequence[int] = (0,)) -> _functional.FunctionalMetric:
  """Fraction of tokens whose argmax prediction is the label, over tokens whose label is not in
  `masked_ids`; predictions `[batch_size, L, vocab]`, labels `[batch_size, L]` int."""
  masked_ids = _check_ids(masked_ids)

  def update(state, labels, batch_output, sample_weight=None):
    w = _token_weights(labels, sample_weight, masked_ids)
    correct = jnp.argmax(batch_output.predictions, axis=-1) == labels
    return {
      'total': state['total'] + jnp.sum(jnp.where(correct, w, 0)),
      'count': state['count'] + jnp.sum(w),
    }

  return _functional.FunctionalMetric(_functional._sum_and_count, update, _functional._mean_of)


def num_tokens(masked_ids: Sequence[int] = (0,)) -> _functional.FunctionalMetric:
  """The number of tokens whose label is not in `masked_ids` (int32)."""
  masked_ids = _check_ids(masked_ids)

  def update(state, labels, batch_output, sample_weight=None):
    del batch_output
    w = _token_weights(labels, sample_weight, masked_ids)
    return state + jnp.sum(w).astype(jnp.int32)

  return _functional.FunctionalMetric(lambda: jnp.zeros((), jnp.int32), update, lambda s: s)


def _positive(predictions: jax.Array, threshold: float, from_logits: bool) -> jax.Array:
  if from_logits:  # sigmoid(p) > t  <=>  p > log(t / (1 - t)), without sigmoid's rounding
    return predictions > math.log(threshold / (1 - threshold))
  return predictions > threshold


def _check_threshold(threshold: float) -> float:
  if not 0 < threshold < 1:
    raise ValueError(f'threshold must be in (0, 1); got {threshold!r}')
  return float(threshold)


def _ratio_metric(update_counts) -> _functional.FunctionalMetric:
  """A metric over sums `{'hits', 'others'}` finalized as hits / (hits + others), 0 when empty."""

  def initialize():
    return {'hits': jnp.zeros((), jnp.float32), 'others': jnp.zeros((), jnp.float32)}

  def update(state, labels, batch_output, sample_weight=None):
    hits, others = update_counts(batch_output.predictions, labels, sample_weight)
    return {'hits': state['hits'] + hits, 'others': state['others'] + others}

  def finalize(state):
    return _functional._safe_divide(state['hits'], state['hits'] + state['others'])

  return _functional.FunctionalMetric(initialize, update, finalize)


def precision(threshold: float = 0.5, from_logits: bool = True) -> _functional.FunctionalMetric:
  """Keras's `Precision()`: true positives / predicted positives over every (example, label);
  predictions `[batch_size, labels]` (logits when `from_logits`), labels multi-hot 0/1."""
  threshold = _check_threshold(threshold)

  def counts(predictions, labels, sample_weight):
    positive = _positive(predictions, threshold, from_logits)
    w = _token_weights(labels, sample_weight, ())
    actual = labels > 0
    return jnp.sum(jnp.where(positive & actual, w, 0)), jnp.sum(jnp.where(positive & ~actual, w, 0))

  return _ratio_metric(counts)


def recall_at_k(
  k: int = 5, threshold: float | None = None, from_logits: bool = True
) -> _functional.FunctionalMetric:
  """Keras's `Recall(top_k=k)`: true positives / actual positives over every (example, label),
  where a prediction is positive when it is among its example's `k` highest scores (ties: the
  lower index first, as `tf.math.top_k`); shapes as `precision`.

  Setting `top_k` makes Keras's threshold -inf (`thresholds=None`), so a true label among the
  top `k` is recalled whatever its probability: `threshold=None`, the default, does the same.
  A `threshold` in (0, 1) also requires the score above it (Keras's `Recall(thresholds=t,
  top_k=k)`).
  """
  if threshold is not None:
    threshold = _check_threshold(threshold)
  if not isinstance(k, int) or isinstance(k, bool) or k < 1:
    raise ValueError(f'k must be an int >= 1; got {k!r}')

  def counts(predictions, labels, sample_weight):
    _, top = jax.lax.top_k(predictions, k)
    positive = jnp.any(jax.nn.one_hot(top, predictions.shape[-1], dtype=jnp.bool_), axis=-2)
    if threshold is not None:
      positive = positive & _positive(predictions, threshold, from_logits)
    w = _token_weights(labels, sample_weight, ())
    actual = labels > 0
    return jnp.sum(jnp.where(positive & actual, w, 0)), jnp.sum(jnp.where(~positive & actual, w, 0))

  return _ratio_metric(counts)
