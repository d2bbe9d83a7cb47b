"""Federated Averaging (McMahan et al., 2017, "Communication-Efficient Learning of Deep Networks
from Decentralized Data"), weighted and unweighted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from jax.sharding import Mesh

from fedjax_lite import aggregators, models, optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _finalizers, _processes


def build_weighted_fed_avg(
  model: models.FunctionalModel,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  client_weighting: _client_work.ClientWeighting | Callable = (
    _client_work.ClientWeighting.NUM_EXAMPLES
  ),
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """FedAvg with client updates weighted (by default) by their number of examples.

  Each round every sampled client trains the global model with `client_optimizer` on its own
  data; the server averages the model deltas (weighted) and applies them with
  `server_optimizer` (SGD at 1.0 by default: the new model is the weighted average).

  Example:
    >>> process = fl.algorithms.build_weighted_fed_avg(
    ...     model, client_optimizer=fl.optimizers.build_sgdm(0.1))
    >>> state = process.initialize()
    >>> state, metrics = process.next(state, client_batches)
    >>> metrics['client_work']['train']['loss']

  Args:
    model: a `FunctionalModel`.
    client_optimizer: optax transformation for local training (fresh state each round).
    server_optimizer: optax transformation applied to the averaged delta; default
      `build_sgdm(1.0)`.
    client_weighting: `ClientWeighting.NUM_EXAMPLES` (default), `UNIFORM`, or a callable of a
      client's finalized metrics.
    model_distributor: default `build_broadcast_process`.
    model_aggregator: an aggregation factory; default `MeanFactory()`.
    metrics_aggregator: default `fl.metrics.sum_then_finalize`.
    client_chunk_size: clients vmapped together (see `build_model_delta_client_work`).
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: each device trains its own clients
      and the sums are combined once per round.
    seed: seeds the per-round keys of models that take an `rng` (dropout).

  Returns:
    A `LearningProcess`; `next(state, client_batches)` is one compiled call.
  """
  server_optimizer = server_optimizer or optimizers.build_sgdm(1.0)
  client_work = _client_work.build_model_delta_client_work(
    model,
    client_optimizer,
    client_weighting,
    metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(server_optimizer, model.initial_weights)
  return _common.compose(model, client_work, finalizer, model_distributor, model_aggregator)


def build_unweighted_fed_avg(
  model: models.FunctionalModel,
  client_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """FedAvg where every client that trained counts once.

  Clients are weighted `UNIFORM` and averaged with `MeanFactory`. A client with no examples or
  with a non-finite update (and any padding) takes no part: it is left out of the mean instead
  of diluting it with a zero update as TFF's `UnweightedMeanFactory` would — and out of any
  other `model_aggregator` too (an `UnweightedMeanFactory` does not count it, a median does not
  rank it; see `fl.templates.build_client_work`). Arguments as `build_weighted_fed_avg`.
  """
  return build_weighted_fed_avg(
    model,
    client_optimizer,
    server_optimizer,
    client_weighting=_client_work.ClientWeighting.UNIFORM,
    model_distributor=model_distributor,
    model_aggregator=model_aggregator or aggregators.MeanFactory(),
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
