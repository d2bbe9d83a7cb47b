"""`compose_learning_process`: distributor → client work → aggregator → finalizer, one round."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.templates import _layout, _processes


class LearningAlgorithmState(NamedTuple):
  """The server state of a composed learning process; each component's state under its name."""

  global_model_weights: Any
  distributor: Any
  client_work: Any
  aggregator: Any
  finalizer: Any


def _check_component(value, cls, name):
  if not isinstance(value, cls):
    raise TypeError(f'{name} must be a {cls.__name__}; got {type(value).__name__}')


def _host_checked(jitted: Callable, check: Callable[[Any], None]) -> Callable:
  """`jitted` (a round's `next`) preceded by `check(client_batches)` on the host, before the
  round is dispatched: never inside the compiled round (it sees no value there). Under an outer
  `jit`/`vmap` the check skips traced data itself (a driver that re-jits `next` can call
  `next.check_client_data(client_batches)` first). Keeps `jitted`'s `lower`, `trace`,
  `eval_shape` and cache size, so the wrapper still reads as a jitted function (and a
  `TunedNext`'s `tune`, `layout` and `with_donated_state`)."""

  @functools.wraps(jitted)
  def next_fn(state, client_batches, *args, **kwargs):
    check(client_batches)
    return jitted(state, client_batches, *args, **kwargs)

  kept = ('lower', 'trace', 'eval_shape', '_cache_size', 'clear_cache')
  tuned = ('tune', 'layout', 'with_donated_state')  # a TunedNext's
  for name in kept + tuned:
    if hasattr(jitted, name):
      setattr(next_fn, name, getattr(jitted, name))
  # For a driver that jits `next` again (donating the state): the check to run before it.
  next_fn.check_client_data = check
  return next_fn


def _without_steps(client_batches: Any) -> Any:
  """`client_batches`' shapes with the step axis (axis 1 of the batch and mask) set to 0."""

  def spec(x, steps_axis):
    shape = list(np.shape(x))
    if steps_axis:
      shape[1] = 0
    return jax.ShapeDtypeStruct(tuple(shape), x.dtype if hasattr(x, 'dtype') else np.result_type(x))

  ids = client_batches.client_ids
  return client_batches._replace(
    batch=jax.tree.map(lambda x: spec(x, True), client_batches.batch),
    mask=spec(client_batches.mask, True),
    client_ids=None if ids is None else spec(ids, False),
  )


def compose_learning_process(
  initial_model_weights_fn: Callable[[], Any],
  model_weights_distributor: _processes.DistributionProcess,
  client_work: _processes.ClientWorkProcess,
  model_update_aggregator: _processes.AggregationProcess,
  model_finalizer: _processes.FinalizerProcess,
  *,
  client_data_spec: Any = None,
  initial_client_state: Any = None,
) -> _processes.LearningProcess:
  """Chains the four building blocks into a `LearningProcess` whose `next` is one `jax.jit`.

  One round: the distributor sends the global weights; client work trains every client; the
  aggregator reduces the updates over the client axis (weighted when it takes weights); the
  finalizer applies the aggregate to the global weights. When both the client work and the
  aggregator stream (`ClientWorkProcess.streams`, `AggregationProcess.streams`), the
  aggregator's per-client part runs inside the cohort loop and the updates are summed as the
  chunks go: a round's memory is then set by the chunk, not the cohort. Otherwise the updates
  are stacked `[clients, ...]` and handed to the aggregator's `next`, with the client work's
  `ClientResult.client_mask` as `client_mask=` (padding is invisible to stacked aggregators
  too). When the client work has a `check_client_data`, `next` runs it on the host on concrete
  client data before dispatching the compiled round (e.g. labels outside a classifier's
  classes raise a ValueError naming the client). Metrics are nested
  `{'distributor', 'client_work', 'aggregator', 'finalizer'}`; hyperparameters
  `{'client_work', 'finalizer'}`.

  Args:
    initial_model_weights_fn: `() -> ModelWeights`.
    model_weights_distributor: a `DistributionProcess`.
    client_work: a `ClientWorkProcess`.
    model_update_aggregator: an `AggregationProcess`.
    model_finalizer: a `FinalizerProcess`.
    client_data_spec: optional `ClientBatches` of `jax.ShapeDtypeStruct` used to validate the
      composition at construction (see `LearningProcess`).
    initial_client_state: for client work with per-client state, the state of a client never
      seen (one client's pytree). The process is then stateful: `next(state, client_batches,
      client_states)` hands the client work `client_states` as its per-client inputs and
      returns its per-client outputs as the new states (`StatefulLearningProcessOutput`).

  Returns:
    A `LearningProcess` with state `LearningAlgorithmState`.
  """
  if not callable(initial_model_weights_fn):
    raise TypeError('initial_model_weights_fn must be a callable returning ModelWeights')
  _check_component(
    model_weights_distributor, _processes.DistributionProcess, 'model_weights_distributor'
  )
  _check_component(client_work, _processes.ClientWorkProcess, 'client_work')
  _check_component(
    model_update_aggregator, _processes.AggregationProcess, 'model_update_aggregator'
  )
  _check_component(model_finalizer, _processes.FinalizerProcess, 'model_finalizer')
  weighted = model_update_aggregator.is_weighted

  def initialize():
    return LearningAlgorithmState(
      global_model_weights=initial_model_weights_fn(),
      distributor=model_weights_distributor.initialize(),
      client_work=client_work.initialize(),
      aggregator=model_update_aggregator.initialize(),
      finalizer=model_finalizer.initialize(),
    )

  streaming = client_work.streams and model_update_aggregator.streams
  state_spec = jax.eval_shape(initialize)

  def check_state(state):
    mismatch = tree_lib.tree_spec_mismatch(state_spec, state)
    if mismatch is not None:
      raise ValueError(
        f"state does not match this process's state: {mismatch}. Tip: a state from another "
        'process or model; start from process.initialize() or its checkpoint.'
      )

  def run_round(state, client_batches, client_states):
    """`(new state, metrics, client outputs)`; `client_states` is `None` when stateless."""
    check_state(state)  # at trace time: shapes and dtypes only
    client_inputs = () if client_states is None else (client_states,)
    distributed = model_weights_distributor.next(state.distributor, state.global_model_weights)
    agg_state = state.aggregator
    if streaming:
      # The aggregator's per-client part runs inside the cohort loop; only sums leave it.
      if weighted:
        client_part = lambda value, weight, cid: model_update_aggregator.client_part(
          agg_state, value, weight, cid
        )
      else:
        client_part = lambda value, weight, cid: model_update_aggregator.client_part(
          agg_state, value, cid
        )
      trained = client_work.next(
        state.client_work,
        distributed.result,
        client_batches,
        *client_inputs,
        client_part=client_part,
      )
      aggregated = model_update_aggregator.server_part(agg_state, trained.result.accumulated)
    else:
      trained = client_work.next(
        state.client_work, distributed.result, client_batches, *client_inputs
      )
      update, weight = trained.result.update, trained.result.update_weight
      aggregate_args = (update, weight) if weighted else (update,)
      # Clients that take no part (padding, no example, non-finite) are masked out of stacked
      # aggregators too (a median must not count their zero updates).
      aggregated = _processes.with_client_mask(model_update_aggregator.next)(
        agg_state, *aggregate_args, client_mask=getattr(trained.result, 'client_mask', None)
      )
    finalized = model_finalizer.next(state.finalizer, state.global_model_weights, aggregated.result)
    new_state = LearningAlgorithmState(
      global_model_weights=finalized.result,
      distributor=distributed.state,
      client_work=trained.state,
      aggregator=aggregated.state,
      finalizer=finalized.state,
    )
    metrics = {
      'distributor': distributed.measurements,
      'client_work': trained.measurements,
      'aggregator': aggregated.measurements,
      'finalizer': finalized.measurements,
    }
    return new_state, metrics, trained.result.client_outputs

  if initial_client_state is None:

    def next_fn(state, client_batches):
      return _processes.LearningProcessOutput(*run_round(state, client_batches, None)[:2])

  else:

    def next_fn(state, client_batches, client_states):
      return _processes.StatefulLearningProcessOutput(
        *run_round(state, client_batches, client_states)
      )

  def get_model_weights(state):
    return state.global_model_weights

  def set_model_weights(state, model_weights):
    mismatch = tree_lib.tree_spec_mismatch(state_spec.global_model_weights, model_weights)
    if mismatch is not None:
      raise ValueError(
        f"model_weights do not match this process's model: {mismatch}. Tip: build the process "
        'from the model these weights belong to.'
      )
    return state._replace(global_model_weights=model_weights)

  def get_hparams(state):
    return {
      'client_work': client_work.get_hparams(state.client_work),
      'finalizer': model_finalizer.get_hparams(state.finalizer),
    }

  def set_hparams(state, hparams):
    unknown = sorted(set(hparams) - {'client_work', 'finalizer'})
    if unknown:
      raise ValueError(f"hparams has unknown keys {unknown}; expected 'client_work', 'finalizer'")
    return state._replace(
      client_work=client_work.set_hparams(state.client_work, hparams.get('client_work', {})),
      finalizer=model_finalizer.set_hparams(state.finalizer, hparams.get('finalizer', {})),
    )

  if client_work.auto_chunk:  # the chunk is measured the first time a shape runs
    devices = client_work.client_devices  # each loops over its share of the cohort
    jitted_next = _layout.TunedNext(
      next_fn,
      lambda args: -(-args[1].mask.shape[0] // devices),
      key_args=lambda args: (args[0], _without_steps(args[1]), *args[2:]),
    )
  else:
    jitted_next = jax.jit(next_fn)
  if client_work.check_client_data is not None:
    jitted_next = _host_checked(jitted_next, client_work.check_client_data)
  return _processes.LearningProcess(
    jax.jit(initialize),
    jitted_next,
    get_model_weights,
    set_model_weights,
    get_hparams,
    set_hparams,
    client_data_spec=client_data_spec,
    initial_client_state=initial_client_state,
  )
