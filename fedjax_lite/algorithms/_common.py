"""The composition every algorithm shares: defaults for distributor and aggregator, the spec."""

from __future__ import annotations

from typing import Any

from fedjax_lite import aggregators, models
from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _client_work, _composers, _distributors, _processes


def compose(
  model: models.FunctionalModel,
  client_work: _processes.ClientWorkProcess,
  model_finalizer: _processes.FinalizerProcess,
  model_distributor: _processes.DistributionProcess | None,
  model_aggregator: Any | None,
  update_spec: Any = None,
  initial_client_state: Any = None,
) -> _processes.LearningProcess:
  """Composes an algorithm, creating the aggregator for its updates.

  `update_spec` is the spec of one client's update; default the model's trainable weights.
  `initial_client_state` makes the process stateful (see `compose_learning_process`). A client
  work without a `check_client_data` (one that wraps `build_client_work`'s) gets the model's
  (`client_data_check`: a classifier's labels checked on the host before each round).
  """
  weights_spec = tree_lib.tree_specs(model.initial_weights)
  if model_distributor is None:
    model_distributor = _distributors.build_broadcast_process(weights_spec)
  if model_aggregator is None:
    model_aggregator = aggregators.MeanFactory()
  if not hasattr(model_aggregator, 'create'):
    raise TypeError(
      'model_aggregator must be an aggregation factory with create(value_spec) (e.g. '
      f'fl.aggregators.MeanFactory()); got {type(model_aggregator).__name__}'
    )
  if update_spec is None:
    update_spec = weights_spec.trainable
  aggregator = model_aggregator.create(update_spec)
  if client_work.check_client_data is None and isinstance(model, models.FunctionalModel):
    client_work = client_work._replace(check_client_data=_client_work.client_data_check(model))
  initial_weights = model.initial_weights
  return _composers.compose_learning_process(
    lambda: initial_weights,
    model_distributor,
    client_work,
    aggregator,
    model_finalizer,
    client_data_spec=_client_batches.client_batches_spec(model.input_spec, 2, 2),
    initial_client_state=initial_client_state,
  )
