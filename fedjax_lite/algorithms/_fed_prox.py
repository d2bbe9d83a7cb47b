"""FedProx (Li et al., 2020, "Federated Optimization in Heterogeneous Networks"): FedAvg whose
clients minimize `F(w) + μ/2·‖w − w₀‖²`, w₀ the broadcast weights, weighted and unweighted."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_lite import aggregators, models, optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.optimizers import _optimizers
from fedjax_lite.templates import _client_work, _finalizers, _processes

PROXIMAL_STRENGTH = 'proximal_strength'


def _proximal_term(anchor: Any, strength: jax.Array) -> optax.GradientTransformation:
  """Adds the gradient of `strength/2·‖w − anchor‖²`, `strength·(w − anchor)`, to the gradient."""

  def update(grads, state, params):
    return jax.tree.map(lambda g, w, w0: g + strength * (w - w0), grads, params, anchor), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def _fed_prox_client_loop(model: models.FunctionalModel, optimizer: optax.GradientTransformation):
  """FedAvg's client loop with `optimizer` seeing the proximal gradient (μ = 0 is FedAvg's)."""

  def client_loop(model_weights, hparams):
    hparams = dict(hparams)
    strength = hparams.pop(PROXIMAL_STRENGTH)
    local = optax.chain(_proximal_term(model_weights.trainable, strength), optimizer)
    return _client_work.model_delta_client_loop(model, local)(model_weights, hparams)

  return client_loop


def build_weighted_fed_prox(
  model: models.FunctionalModel,
  proximal_strength: float,
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
  """FedProx (Li et al., 2020), TFF's `tff.learning.algorithms.build_weighted_fed_prox`.

  FedAvg whose clients minimize `F(w) + μ/2·‖w − w₀‖²`: `client_optimizer` is given the gradient
  `∇F(w) + μ·(w − w₀)`, w₀ the broadcast weights. With `proximal_strength=0` it is FedAvg.
  TFF 0.87 adds `μ·(w₀ − w)` instead (the opposite sign); this follows the paper.
  `proximal_strength` is a hyperparameter in state:
  `process.set_hparams(state, {'client_work': {'proximal_strength': 0.1}})`.

  Example:
    >>> process = fl.algorithms.build_weighted_fed_prox(
    ...     model, proximal_strength=0.01, client_optimizer=fl.optimizers.build_sgdm(0.1))
    >>> state, metrics = process.next(process.initialize(), client_batches)

  Args:
    model: a `FunctionalModel`.
    proximal_strength: μ, a finite number >= 0.
    client_optimizer: optax transformation for local training (fresh state each round).
    server_optimizer: applied to the averaged delta; default `build_sgdm(1.0)`.
    client_weighting, model_distributor, model_aggregator, metrics_aggregator,
      client_chunk_size, mesh, seed: as `build_weighted_fed_avg`.

  Returns:
    A `LearningProcess`; client-work hparams are the client optimizer's plus
    `proximal_strength`, metrics as `build_weighted_fed_avg`'s.
  """
  _optimizers.check_non_negative(PROXIMAL_STRENGTH, proximal_strength)
  _client_work.check_model(model)
  _client_work.check_optimizer(client_optimizer, 'client_optimizer')
  hparams = optimizers.get_hparams(client_optimizer.init(model.initial_weights.trainable))
  if PROXIMAL_STRENGTH in hparams:
    raise ValueError(f'client_optimizer has a hyperparameter named {PROXIMAL_STRENGTH!r}')
  hparams[PROXIMAL_STRENGTH] = jnp.asarray(proximal_strength, jnp.float32)
  client_work = _client_work.build_client_work(
    model,
    _fed_prox_client_loop(model, client_optimizer),
    hparams,
    client_weighting=client_weighting,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(
    server_optimizer or optimizers.build_sgdm(1.0), model.initial_weights
  )
  return _common.compose(model, client_work, finalizer, model_distributor, model_aggregator)


def build_unweighted_fed_prox(
  model: models.FunctionalModel,
  proximal_strength: float,
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
  """FedProx (Li et al., 2020) where every client that trained counts once, TFF's
  `tff.learning.algorithms.build_unweighted_fed_prox`. Weighting and averaging as
  `build_unweighted_fed_avg`; arguments as `build_weighted_fed_prox`."""
  return build_weighted_fed_prox(
    model,
    proximal_strength,
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
