"""Aggregation factories: `create(value_spec)` builds an `AggregationProcess` for that value.

Client values arrive stacked on a leading client axis, `[clients, ...]`; the result has the
value's own shape. Factories are stateless and empty-measured unless they say otherwise.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite import tree as tree_lib
from fedjax_lite.templates import _processes


def _empty_state():
  return ()


def _spec(value_spec: Any) -> Any:
  if value_spec is None:
    raise ValueError('value_spec must be a pytree of arrays or jax.ShapeDtypeStruct; got None')
  return tree_lib.tree_specs(value_spec)


class SumFactory:
  """Sum over clients, unweighted: `next(state, value [clients, ...]) -> sum`."""

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def next_fn(state, value):
      return _processes.MeasuredProcessOutput(state, tree_lib.tree_sum_over_clients(value), {})

    return _processes.AggregationProcess(
      _empty_state, next_fn, value_spec=_spec(value_spec), weighted=False
    )


class UnweightedMeanFactory:
  """Mean over clients, every client counting once: `next(state, value [clients, ...])`."""

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def next_fn(state, value):
      mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), value)
      return _processes.MeasuredProcessOutput(state, mean, {})

    return _processes.AggregationProcess(
      _empty_state, next_fn, value_spec=_spec(value_spec), weighted=False
    )


class MeanFactory:
  """Weighted mean over clients: `next(state, value [clients, ...], weight [clients])`.

  `sum_c w_c v_c / sum_c w_c`. A round whose weights are all 0 yields zeros (not NaN), so an
  empty round cannot poison the model. Measurements: `{'total_weight': [] float32}`.
  """

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def next_fn(state, value, weight):
      weight = weight.astype(jnp.float32)
      total = jnp.sum(weight)
      scale = jnp.where(total > 0, 1.0 / jnp.where(total > 0, total, 1.0), 0.0)
      mean = tree_lib.tree_weighted_sum(value, weight * scale)
      return _processes.MeasuredProcessOutput(state, mean, {'total_weight': total})

    return _processes.AggregationProcess(_empty_state, next_fn, value_spec=_spec(value_spec))
