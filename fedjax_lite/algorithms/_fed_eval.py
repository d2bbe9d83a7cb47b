"""Federated evaluation: the global model's metrics on every client's data, nothing trained."""

from __future__ import annotations

from collections.abc import Callable

import jax.numpy as jnp

from fedjax_lite import aggregators, models
from fedjax_lite import metrics as metrics_lib
from fedjax_lite import tree as tree_lib
from fedjax_lite.algorithms import _common
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _client_work, _cohort, _processes


def _identity_finalizer() -> _processes.FinalizerProcess:
  def next_fn(state, model_weights, update):
    del update
    return _processes.MeasuredProcessOutput(state, model_weights, {})

  return _processes.FinalizerProcess(lambda: (), next_fn)


def build_fed_eval(
  model: models.FunctionalModel,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | None = None,
) -> _processes.LearningProcess:
  """Evaluates the global model (`training=False`) on each round's clients.

  The process state holds the model to evaluate (set it with `set_model_weights`) and the
  metric state summed over all rounds so far. Metrics:
  `metrics['client_work']['eval']['current_round_metrics' | 'total_rounds_metrics']`, each with
  `loss`, `num_examples` and the model's metrics.

  Example:
    >>> evaluation = fl.algorithms.build_fed_eval(model)
    >>> state = evaluation.set_model_weights(evaluation.initialize(), trained_weights)
    >>> _, metrics = evaluation.next(state, client_batches)
  """
  _client_work.check_model(model)
  _cohort.check_chunk_size(client_chunk_size)
  metric_init, metric_update, metric_finalize = _client_work.training_metric_fns(model)
  aggregate_metrics = (metrics_aggregator or metrics_lib.sum_then_finalize)(metric_finalize)

  def initialize():
    return metric_init()

  def next_fn(state, model_weights, client_batches):
    _client_batches.check_client_batches(client_batches, model.input_spec)

    def step(metric_state, batch, mask, step_index):
      del step_index
      _, (batch_output, y) = _client_work.masked_forward(model, model_weights, batch, mask, False)
      return metric_update(metric_state, y, batch_output, mask)

    client_states = _cohort.run_clients(
      lambda index: metric_init(), step, lambda s: s, client_batches, client_chunk_size
    )
    round_state = tree_lib.tree_sum_over_clients(client_states)
    total_state = tree_lib.tree_add(state, round_state)
    measurements = {
      'eval': {
        'current_round_metrics': aggregate_metrics(client_states),
        'total_rounds_metrics': metric_finalize(total_state),
      }
    }
    num_clients = client_batches.mask.shape[0]
    result = _processes.ClientResult((), jnp.zeros((num_clients,)))
    return _processes.MeasuredProcessOutput(total_state, result, measurements)

  client_work = _processes.ClientWorkProcess(initialize, next_fn)
  return _common.compose(
    model,
    client_work,
    _identity_finalizer(),
    model_distributor,
    aggregators.SumFactory(),
    update_spec=(),
  )
