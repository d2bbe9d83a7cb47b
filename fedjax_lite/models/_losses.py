"""Losses in `FunctionalModel`'s `loss_fn` form: `(predictions, labels, sample_weight=None) -> []`.

Each is the mean over examples weighted by `sample_weight` (the padding mask): padded rows
change neither the value nor the gradient with respect to the real rows' predictions, and a
batch with no real example gives 0. Client work also zeroes padded inputs before the forward
pass (`templates._client_work.masked_batch`), so junk in padding cannot reach the weights'
gradients through a model that is finite at 0.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def weighted_mean(values: jax.Array, sample_weight: jax.Array | None) -> jax.Array:
  """`[]` mean of `values` `[batch_size]` weighted by `sample_weight` `[batch_size]`; 0 if empty."""
  if sample_weight is None:
    return jnp.mean(values)
  w = sample_weight.astype(values.dtype)
  total = jnp.sum(w)
  # Padded rows may hold junk (inf, nan): select them away before they meet the weights.
  values = jnp.where(w > 0, values, 0)
  return jnp.sum(values * w) / jnp.where(total > 0, total, 1)


def softmax_cross_entropy(
  logits: jax.Array, labels: jax.Array, sample_weight: jax.Array | None = None
) -> jax.Array:
  """Sparse softmax cross-entropy of `logits` `[batch_size, classes]` and int `labels`."""
  per_example = optax.softmax_cross_entropy_with_integer_labels(logits, labels.astype(jnp.int32))
  return weighted_mean(per_example, sample_weight)


def mean_squared_error(
  predictions: jax.Array, labels: jax.Array, sample_weight: jax.Array | None = None
) -> jax.Array:
  """Squared error averaged over non-batch dimensions, then over examples."""
  diff = jnp.reshape(predictions - labels, (predictions.shape[0], -1))
  return weighted_mean(jnp.mean(diff**2, axis=1), sample_weight)
