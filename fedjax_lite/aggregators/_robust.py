"""Robust aggregation: TFF's `clipping_factory` and `zeroing_factory` (streamed: the per-client
clip or zeroing runs inside the cohort loop), and the aggregators of poisoning studies that need
every client at once (coordinate-wise median, trimmed mean, Krum), on stacked values."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite import tree as tree_lib
from fedjax_lite.aggregators import _factories, _quantile
from fedjax_lite.templates import _processes


def global_norm(value: Any, order: float = 2.0) -> jax.Array:
  """`[] float32` norm of all leaves of `value` taken together: L1, L2 or L-infinity.

  Reduced leaf by leaf: the leaves are never concatenated (no copy of the update).
  """
  leaves = [x.astype(jnp.float32) for x in jax.tree.leaves(value)]
  if not leaves:
    return jnp.float32(0.0)
  if order == 1.0:
    return sum(jnp.sum(jnp.abs(x)) for x in leaves)
  if order == 2.0:
    return jnp.sqrt(sum(jnp.sum(x * x) for x in leaves))
  return functools.reduce(jnp.maximum, [jnp.max(jnp.abs(x)) for x in leaves])


def clip_by_global_norm(value: Any, clip: jax.Array) -> tuple[Any, jax.Array]:
  """`value` scaled onto the L2 ball of radius `clip` when outside it; and its norm."""
  norm = global_norm(value, 2.0)
  scale = clip / jnp.maximum(norm, clip)
  return jax.tree.map(lambda x: (x * scale).astype(x.dtype), value), norm


def _norm_process(norm: Any, name: str) -> _processes.EstimationProcess:
  if isinstance(norm, _processes.EstimationProcess):
    return norm
  if isinstance(norm, bool) or not isinstance(norm, int | float) or not norm > 0:
    raise ValueError(f'{name} must be a number > 0 or an EstimationProcess; got {norm!r}')
  if not math.isfinite(norm):
    raise ValueError(f'{name} must be finite; got {norm!r}')
  return _quantile.constant_estimate(float(norm))


class _NormBoundFactory:
  """Applies a per-client bound (clip or zero) by a norm, then aggregates with the inner factory.

  State `{'<kind>ing_norm', 'inner_agg', '<kind>ed_count_agg'}`, measurements `{'<kind>ing':
  inner measurements, '<kind>ing_norm', '<kind>ed_count'}`, as TFF names them.
  """

  def __init__(self, kind, norm, inner_agg_factory, count_sum_factory, bound_fn):
    if not hasattr(inner_agg_factory, 'create'):
      raise TypeError(
        f'inner_agg_factory must be an aggregation factory; got {type(inner_agg_factory).__name__}'
      )
    self._kind = kind
    self._norm = _norm_process(norm, f'{kind}ing_norm')
    self._inner = inner_agg_factory
    self._count = count_sum_factory or _factories.SumFactory()
    self._bound = bound_fn

  def create(self, value_spec: Any, weight_spec: Any = None) -> _processes.AggregationProcess:
    del weight_spec
    kind, norm_process, bound = self._kind, self._norm, self._bound
    inner = self._inner.create(value_spec)
    expected = f'{kind}ed_count_sum_factory must create an unweighted process over [] int32 counts'
    try:
      count = self._count.create(jax.ShapeDtypeStruct((), jnp.int32))
    except TypeError as e:
      raise TypeError(f'{expected}: {e}') from e
    if count.is_weighted:
      raise TypeError(f'{expected}; it created a weighted one')
    keys = (f'{kind}ing_norm', 'inner_agg', f'{kind}ed_count_agg')

    def initialize():
      return dict(
        zip(keys, (norm_process.initialize(), inner.initialize(), count.initialize()), strict=True)
      )

    def measured(state, limit, norm_state, agg, counted):
      new_state = dict(zip(keys, (norm_state, agg.state, counted.state), strict=True))
      measurements = {
        f'{kind}ing': agg.measurements,
        f'{kind}ing_norm': limit,
        f'{kind}ed_count': counted.result,
      }
      return _processes.MeasuredProcessOutput(new_state, agg.result, measurements)

    if inner.streams and count.streams and norm_process.streams:

      def client_part(state, value, *weight_and_id):
        *weight, client_id = weight_and_id
        limit = norm_process.report(state[keys[0]])
        value, norm, hit = bound(value, limit)
        return (
          norm_process.client_part(state[keys[0]], norm),
          inner.client_part(state[keys[1]], value, *weight, client_id),
          count.client_part(state[keys[2]], hit, client_id),
        )

      def server_part(state, total):
        norm_sum, value_sum, count_sum = total
        return measured(
          state,
          norm_process.report(state[keys[0]]),
          norm_process.server_part(state[keys[0]], norm_sum),
          inner.server_part(state[keys[1]], value_sum),
          count.server_part(state[keys[2]], count_sum),
        )

      return _processes.AggregationProcess(
        initialize, None, inner.is_weighted, client_part=client_part, server_part=server_part
      )

    def next_fn(state, value, *weight, client_mask=None):
      limit = norm_process.report(state[keys[0]])
      value, norms, hits = jax.vmap(lambda v: bound(v, limit))(value)
      return measured(
        state,
        limit,
        norm_process.next(state[keys[0]], norms, client_mask=client_mask),
        inner.next(state[keys[1]], value, *weight, client_mask=client_mask),
        count.next(state[keys[2]], hits, client_mask=client_mask),
      )

    if inner.is_weighted:
      return _processes.AggregationProcess(
        initialize, lambda s, v, w, *, client_mask=None: next_fn(s, v, w, client_mask=client_mask)
      )
    return _processes.AggregationProcess(
      initialize, lambda s, v, *, client_mask=None: next_fn(s, v, client_mask=client_mask), False
    )


def clipping_factory(
  clipping_norm: float | _processes.EstimationProcess,
  inner_agg_factory: Any,
  clipped_count_sum_factory: Any = None,
) -> _NormBoundFactory:
  """Projects each client's value onto the L2 ball of `clipping_norm` (the global norm over all
  leaves), then aggregates with `inner_agg_factory` (whose weightedness it takes).

  `clipping_norm` is a number or an `EstimationProcess` fed every client's norm (e.g.
  `PrivateQuantileEstimationProcess.no_noise(...)` for an adaptive clip). Measurements:
  `clipping` (the inner ones), `clipping_norm` (used this round), `clipped_count`.

  Example:
    >>> agg = fl.aggregators.clipping_factory(1.0, fl.aggregators.MeanFactory())
    >>> fl.algorithms.build_weighted_fed_avg(model, opt, model_aggregator=agg)
  """

  def clip(value, limit):
    clipped, norm = clip_by_global_norm(value, limit)
    return clipped, norm, (norm > limit).astype(jnp.int32)

  return _NormBoundFactory(
    'clipp', clipping_norm, inner_agg_factory, clipped_count_sum_factory, clip
  )


def zeroing_factory(
  zeroing_norm: float | _processes.EstimationProcess,
  inner_agg_factory: Any,
  norm_order: float = math.inf,
  zeroed_count_sum_factory: Any = None,
) -> _NormBoundFactory:
  """Replaces by zeros each client's value whose norm exceeds `zeroing_norm`, then aggregates with
  `inner_agg_factory`. The weight of a zeroed value is kept (TFF's choice), so heavy zeroing
  pulls a weighted mean toward zero.

  `norm_order` is 1.0, 2.0 or `math.inf` (TFF's default: the largest absolute value).
  Measurements: `zeroing`, `zeroing_norm`, `zeroed_count`.
  """
  if norm_order not in (1.0, 2.0) and norm_order != math.inf:
    raise ValueError(f'norm_order must be 1.0, 2.0 or math.inf; got {norm_order!r}')

  def zero(value, limit):
    norm = global_norm(value, norm_order)
    hit = norm > limit
    return (
      tree_lib.tree_where(hit, tree_lib.tree_zeros_like(value), value),
      norm,
      hit.astype(jnp.int32),
    )

  return _NormBoundFactory('zero', zeroing_norm, inner_agg_factory, zeroed_count_sum_factory, zero)


def _stacked_factory(reduce_fn):
  """An unweighted factory of a reduction that needs every client's value at once.

  `reduce_fn(value [clients, ...], client_mask [clients] bool) -> (result, measurements)`,
  over the clients of `client_mask` only (every client when `next` gets none): padding and
  clients without an example are left out (see `AggregationProcess`).
  """

  class StackedFactory:
    def create(self, value_spec: Any) -> _processes.AggregationProcess:
      spec = _factories.float_spec(value_spec)

      def next_fn(state, value, *, client_mask=None):
        n = jax.tree.leaves(value)[0].shape[0]
        if client_mask is None:
          client_mask = jnp.ones((n,), bool)
        result, measurements = reduce_fn(value, jnp.asarray(client_mask, bool))
        return _processes.MeasuredProcessOutput(state, result, measurements)

      return _processes.AggregationProcess(lambda: (), next_fn, False, value_spec=spec)

  return StackedFactory()


def _sorted_present_first(x: jax.Array, client_mask: jax.Array) -> jax.Array:
  """`x` `[clients, ...]` sorted along the clients, the clients outside `client_mask` last.

  The absent clients are set to +inf before one sort: the first `sum(client_mask)` rows are
  then the present clients' values in ascending order (a present +inf ties with them).
  """
  m = jnp.reshape(client_mask, client_mask.shape + (1,) * (x.ndim - 1))
  return jnp.sort(jnp.where(m, x, jnp.inf), axis=0)


def _mean_of_ranks(ordered: jax.Array, start: jax.Array, stop: jax.Array) -> jax.Array:
  """Mean over the sorted axis 0 of `ordered` of the ranks `[start, stop)`; 0 when empty."""
  ranks = jnp.arange(ordered.shape[0])
  keep = jnp.reshape((ranks >= start) & (ranks < stop), (-1,) + (1,) * (ordered.ndim - 1))
  total = jnp.sum(jnp.where(keep, ordered.astype(jnp.float32), 0.0), axis=0)
  return (total / jnp.maximum(stop - start, 1).astype(jnp.float32)).astype(ordered.dtype)


def median_factory():
  """Coordinate-wise median over clients (Yin et al., 2018). Unweighted, on stacked values;
  the median of the clients that take part (zeros when none does)."""

  def reduce(value, client_mask):
    n = jnp.sum(client_mask).astype(jnp.int32)

    # Ranks (n - 1) // 2 to n // 2: the middle one, or the two around the middle; none if n = 0.
    start, stop = (n - 1) // 2, jnp.where(n > 0, n // 2 + 1, 0)

    def median(x):
      return _mean_of_ranks(_sorted_present_first(x, client_mask), start, stop)

    return jax.tree.map(median, value), {}

  return _stacked_factory(reduce)


def trimmed_mean_factory(trim_fraction: float):
  """Coordinate-wise mean after dropping the `floor(trim_fraction * clients)` largest and
  smallest values of each coordinate (Yin et al., 2018). Unweighted, on stacked values; `clients`
  counts the clients that take part (zeros when none does)."""
  if not (isinstance(trim_fraction, int | float) and 0 <= trim_fraction < 0.5):
    raise ValueError(f'trim_fraction must be in [0, 0.5); got {trim_fraction!r}')

  def reduce(value, client_mask):
    n = jnp.sum(client_mask).astype(jnp.int32)
    k = jnp.floor(trim_fraction * n.astype(jnp.float32)).astype(jnp.int32)

    def trimmed(x):
      return _mean_of_ranks(_sorted_present_first(x, client_mask), k, n - k)

    return jax.tree.map(trimmed, value), {}

  return _stacked_factory(reduce)


def _krum_bound_error(num_byzantine: int, num_clients: int, what: str) -> str:
  bound = 2 * num_byzantine + 2
  most = (num_clients - 3) // 2
  tip = (
    f'lower num_byzantine to at most {most}, or sample at least {bound + 1} clients a round'
    if most >= 0
    else f'sample at least {bound + 1} clients a round'
  )
  return (
    f'krum_factory: num_byzantine={num_byzantine} needs more than 2 * num_byzantine + 2 = '
    f'{bound} clients a round (Blanchard et al., 2017); {what} is {num_clients}. Tip: {tip}.'
  )


def krum_factory(
  num_byzantine: int, num_selected: int = 1, *, clients_per_round: int | None = None
):
  """Krum (`num_selected=1`) and Multi-Krum (Blanchard et al., 2017): score each client by the
  sum of squared distances to its `clients - num_byzantine - 2` nearest others, average the
  `num_selected` lowest-scoring values. `clients` counts the clients that take part (padding and
  clients without an example are neither scored nor chosen).

  The guarantee needs `clients > 2 * num_byzantine + 2`. A cohort that cannot meet it is
  refused with a ValueError: at construction when `clients_per_round` is given, else when a
  round is traced with a cohort of at most `2 * num_byzantine + 2` clients. When some clients of
  a large enough cohort take no part and too few are left, the round scores the rest on their
  nearest other client and reports `{'byzantine_tolerance_met': 0}` (1 otherwise).
  """
  for name, value, low in [('num_byzantine', num_byzantine, 0), ('num_selected', num_selected, 1)]:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f'{name} must be an int >= {low}; got {value!r}')
  bound = 2 * num_byzantine + 2
  if clients_per_round is not None:
    if isinstance(clients_per_round, bool) or not isinstance(clients_per_round, int):
      raise ValueError(f'clients_per_round must be None or an int; got {clients_per_round!r}')
    if clients_per_round <= bound:
      raise ValueError(_krum_bound_error(num_byzantine, clients_per_round, 'clients_per_round'))

  def reduce(value, client_mask):
    leaves = jax.tree.leaves(value)
    rows = leaves[0].shape[0]
    if rows <= bound:  # shapes are static: refused when the round is traced
      raise _processes.CohortTooSmallError(
        _krum_bound_error(num_byzantine, rows, 'the cohort of this round'), bound + 1
      )
    n = jnp.sum(client_mask).astype(jnp.int32)
    flat = jnp.concatenate([jnp.reshape(x, (rows, -1)).astype(jnp.float32) for x in leaves], axis=1)
    sq = jnp.sum(flat * flat, axis=1)
    distances = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * flat @ flat.T, 0.0)
    # Self-distances and absent clients are infinitely far: never among the nearest.
    pair = client_mask[:, None] & client_mask[None, :] & ~jnp.eye(rows, dtype=bool)
    distances = jnp.where(pair, distances, jnp.inf)
    ranks = jnp.arange(rows)
    nearest = jnp.maximum(n - num_byzantine - 2, 1)
    ordered = jnp.sort(distances, axis=1)
    # A client with fewer others than `nearest` (a lone one) sums the distances it has.
    near = (ranks[None, :] < nearest) & jnp.isfinite(ordered)
    scores = jnp.sum(jnp.where(near, ordered, 0.0), axis=1)
    scores = jnp.where(client_mask, scores, jnp.inf)
    chosen = jnp.argsort(scores, stable=True)[: min(num_selected, rows)]
    selected = ranks[: min(num_selected, rows)] < jnp.minimum(num_selected, n)
    count = jnp.maximum(jnp.sum(selected), 1).astype(jnp.float32)

    def mean_of_chosen(x):
      rows_chosen = x[chosen].astype(jnp.float32)
      keep = jnp.reshape(selected, selected.shape + (1,) * (x.ndim - 1))
      return (jnp.sum(jnp.where(keep, rows_chosen, 0.0), axis=0) / count).astype(x.dtype)

    result = jax.tree.map(mean_of_chosen, value)
    return result, {'byzantine_tolerance_met': (n > bound).astype(jnp.int32)}

  return _stacked_factory(reduce)
