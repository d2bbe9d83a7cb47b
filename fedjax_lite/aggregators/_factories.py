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
  specs = tree_lib.tree_specs(value_spec)
  for path, leaf in jax.tree_util.tree_flatten_with_path(specs)[0]:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f'value_spec leaf {tree_lib.keystr(path)} has dtype {leaf.dtype}; a mean or sum of '
        'model updates needs floating-point values'
      )
  return specs


class SumFactory:
  """Sum over clients, unweighted: `next(state, value [clients, ...]) -> sum`."""

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def next_fn(state, value):
      return _processes.MeasuredProcessOutput(state, tree_lib.tree_sum_over_clients(value), {})

    return _processes.AggregationProcess(_empty_state, next_fn, False, value_spec=_spec(value_spec))


class UnweightedMeanFactory:
  """Mean over clients, every client counting once: `next(state, value [clients, ...])`."""

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def next_fn(state, value):
      mean = jax.tree.map(lambda x: jnp.mean(x, axis=0), value)
      return _processes.MeasuredProcessOutput(state, mean, {})

    return _processes.AggregationProcess(_empty_state, next_fn, False, value_spec=_spec(value_spec))


class MeanFactory:
  """Weighted mean over clients: `next(state, value [clients, ...], weight [clients])`.

  `sum_c w_c v_c / sum_c w_c`. When every weight is 0 (no client contributed), the mean is
  NaN, as TFF's: the default finalizer then rejects the round, leaving the model and the server
  optimizer untouched and reporting `update_non_finite`. With `no_nan_division=True` such a
  round averages to zeros instead. Measurements: `{'total_weight': [] float32}`.
  """

  def __init__(self, no_nan_division: bool = False):
    self._no_nan_division = no_nan_division

  def create(self, value_spec: Any, weight_spec: Any = None) -> _processes.AggregationProcess:
    """`weight_spec` is accepted for TFF's `create(value_type, weight_type)`; weights are
    `[clients]` float32."""
    del weight_spec
    empty_value = 0.0 if self._no_nan_division else jnp.nan

    def next_fn(state, value, weight):
      weight = weight.astype(jnp.float32)
      total = jnp.sum(weight)
      mean = tree_lib.tree_weighted_sum(value, weight / jnp.where(total > 0, total, 1.0))
      mean = jax.tree.map(lambda m: jnp.where(total > 0, m, empty_value).astype(m.dtype), mean)
      return _processes.MeasuredProcessOutput(state, mean, {'total_weight': total})

    return _processes.AggregationProcess(_empty_state, next_fn, value_spec=_spec(value_spec))
