"""Aggregation factories: `create(value_spec)` builds an `AggregationProcess` for that value.

Every factory here streams (TFF's shape): a per-client part that runs inside the cohort loop, a
sum over clients, and a server part that runs once. `MeanFactory` is "multiply by the weight at
the client, an inner sum, divide at the server", with the inner sums themselves factories, so
factories nest. An inner factory that does not stream (it needs every client at once) makes the
outer one work on stacked values `[clients, ...]` too.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite import tree as tree_lib
from fedjax_lite.templates import _processes


def _empty_state():
  return ()


def any_spec(value_spec: Any) -> Any:
  """The `jax.ShapeDtypeStruct`s of `value_spec` (arrays or specs)."""
  if value_spec is None:
    raise ValueError('value_spec must be a pytree of arrays or jax.ShapeDtypeStruct; got None')
  return tree_lib.tree_specs(value_spec)


def float_spec(value_spec: Any) -> Any:
  """The specs of `value_spec`, checked to be floating point (a mean of model updates)."""
  specs = any_spec(value_spec)
  for path, leaf in jax.tree_util.tree_flatten_with_path(specs)[0]:
    if not jnp.issubdtype(leaf.dtype, jnp.inexact):
      raise TypeError(
        f'value_spec leaf {tree_lib.keystr(path)} has dtype {leaf.dtype}; a mean or sum of '
        'model updates needs floating-point values'
      )
  return specs


def _inner(factory: Any, spec: Any, name: str) -> _processes.AggregationProcess:
  """An unweighted inner process of `factory` (default `SumFactory`) for `spec`."""
  process = (factory or SumFactory()).create(spec)
  if not isinstance(process, _processes.AggregationProcess) or process.is_weighted:
    raise TypeError(f'{name} must create an unweighted AggregationProcess (e.g. SumFactory())')
  return process


class SumFactory:
  """Sum over clients, unweighted: `next(state, value [clients, ...]) -> sum` (any dtype: counts
  are summed as integers)."""

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    def client_part(state, value, client_id):
      del state, client_id
      return value

    def server_part(state, total):
      return _processes.MeasuredProcessOutput(state, total, {})

    return _processes.AggregationProcess(
      _empty_state,
      is_weighted=False,
      client_part=client_part,
      server_part=server_part,
      value_spec=any_spec(value_spec),
    )


class UnweightedMeanFactory:
  """Mean over clients, every client counting once: `next(state, value [clients, ...])`.

  Only the clients that take part count (`client_mask`, see `AggregationProcess`): in a
  learning process, padding and clients without an example are not in the denominator. With no
  client, the mean is zeros.

  Args:
    value_sum_factory: the inner sum of the values; default `SumFactory()`.
  """

  def __init__(self, value_sum_factory: Any = None):
    self._value_sum_factory = value_sum_factory

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    spec = float_spec(value_spec)
    inner = _inner(self._value_sum_factory, spec, 'value_sum_factory')

    def divide(summed, count):
      mean = jax.tree.map(lambda s: (s / count).astype(s.dtype), summed.result)
      return _processes.MeasuredProcessOutput(
        summed.state, mean, {'mean_value': summed.measurements}
      )

    if not inner.streams:

      def next_fn(state, value, *, client_mask=None):
        if client_mask is None:
          count = jnp.float32(jax.tree.leaves(value)[0].shape[0])
        else:
          count = jnp.sum(jnp.asarray(client_mask, bool)).astype(jnp.float32)
        summed = inner.next(state, value, client_mask=client_mask)
        return divide(summed, jnp.maximum(count, 1.0))

      return _processes.AggregationProcess(inner.initialize, next_fn, False, value_spec=spec)

    def client_part(state, value, client_id):
      return inner.client_part(state, value, client_id), jnp.float32(1.0)

    def server_part(state, total):
      value_sum, count = total
      return divide(inner.server_part(state, value_sum), jnp.maximum(count, 1.0))

    return _processes.AggregationProcess(
      inner.initialize,
      is_weighted=False,
      client_part=client_part,
      server_part=server_part,
      value_spec=spec,
    )


class MeanFactory:
  """Weighted mean over clients: `next(state, value [clients, ...], weight [clients])`.

  `sum_c w_c v_c / sum_c w_c`: the value is multiplied by its weight at the client, summed by
  `value_sum_factory`, the weights summed by `weight_sum_factory` (both default `SumFactory()`),
  and divided on the server. When every weight is 0 (no client contributed), the mean is NaN,
  as TFF's: the default finalizer then rejects the round, leaving the model and the server
  optimizer untouched and reporting `update_non_finite`. With `no_nan_division=True` such a
  round averages to zeros instead. State `{'value_sum_process', 'weight_sum_process'}`;
  measurements `{'mean_value', 'mean_weight'}` (the inner ones) and `'total_weight' [] float32`.
  """

  def __init__(
    self,
    value_sum_factory: Any = None,
    weight_sum_factory: Any = None,
    no_nan_division: bool = False,
  ):
    self._value_sum_factory = value_sum_factory
    self._weight_sum_factory = weight_sum_factory
    self._no_nan_division = no_nan_division

  def create(self, value_spec: Any, weight_spec: Any = None) -> _processes.AggregationProcess:
    """`weight_spec` is accepted for TFF's `create(value_type, weight_type)`; weights are
    `[]` float32 per client."""
    del weight_spec
    spec = float_spec(value_spec)
    values = _inner(self._value_sum_factory, spec, 'value_sum_factory')
    weights = _inner(
      self._weight_sum_factory, jax.ShapeDtypeStruct((), jnp.float32), 'weight_sum_factory'
    )
    empty_value = 0.0 if self._no_nan_division else jnp.nan

    def initialize():
      return {'value_sum_process': values.initialize(), 'weight_sum_process': weights.initialize()}

    def divide(value_sum, weight_sum):
      total = weight_sum.result
      safe = jnp.where(total > 0, total, 1.0)
      mean = jax.tree.map(
        lambda s: jnp.where(total > 0, s / safe, empty_value).astype(s.dtype), value_sum.result
      )
      state = {'value_sum_process': value_sum.state, 'weight_sum_process': weight_sum.state}
      measurements = {
        'mean_value': value_sum.measurements,
        'mean_weight': weight_sum.measurements,
        'total_weight': total,
      }
      return _processes.MeasuredProcessOutput(state, mean, measurements)

    def weighted(value, weight):
      weight = weight.astype(jnp.float32)
      return jax.tree.map(lambda v: (v * weight).astype(v.dtype), value), weight

    if not (values.streams and weights.streams):

      def next_fn(state, value, weight, *, client_mask=None):
        weight = weight.astype(jnp.float32)
        scaled = jax.tree.map(
          lambda v: (v * jnp.reshape(weight, weight.shape + (1,) * (v.ndim - 1))).astype(v.dtype),
          value,
        )
        return divide(
          values.next(state['value_sum_process'], scaled, client_mask=client_mask),
          weights.next(state['weight_sum_process'], weight, client_mask=client_mask),
        )

      return _processes.AggregationProcess(initialize, next_fn, value_spec=spec)

    def client_part(state, value, weight, client_id):
      value, weight = weighted(value, weight)
      return (
        values.client_part(state['value_sum_process'], value, client_id),
        weights.client_part(state['weight_sum_process'], weight, client_id),
      )

    def server_part(state, total):
      value_sum, weight_sum = total
      return divide(
        values.server_part(state['value_sum_process'], value_sum),
        weights.server_part(state['weight_sum_process'], weight_sum),
      )

    return _processes.AggregationProcess(
      initialize, client_part=client_part, server_part=server_part, value_spec=spec
    )
