"""Federated evaluation: the global model's metrics on every client's data, nothing trained."""

from __future__ import annotations

from collections.abc import Callable

from jax.sharding import Mesh

from fedjax_lite import aggregators, models
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _finalizers, _processes


def build_fed_eval(
  model: models.FunctionalModel,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
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

  def client_loop(model_weights, hparams):
    del hparams

    def step(carry, batch, mask, key):
      del key
      _, step_metrics = _client_work.masked_forward(model, model_weights, batch, mask, False)
      return carry, step_metrics

    return _client_work.ClientLoop(
      lambda client_input, key: (), step, lambda carry: _client_work.ClientOutput()
    )

  client_work = _client_work.build_client_work(
    model,
    client_loop,
    metrics_aggregator=metrics_aggregator,
    evaluation=True,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
  )
  return _common.compose(
    model,
    client_work,
    _finalizers.build_identity_finalizer(),
    model_distributor,
    aggregators.SumFactory(),
    update_spec=(),
  )
