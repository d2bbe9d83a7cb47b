"""Federated SGD (McMahan et al., 2017): clients send gradients at the global weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_lite import models, optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _finalizers, _processes


def gradient_client_loop(model: models.FunctionalModel) -> Callable:
  """Per client: the mean gradient over all its real examples, at the broadcast weights."""

  def client_loop(model_weights, hparams):
    del hparams
    zero_grad = jax.tree.map(jnp.zeros_like, model_weights.trainable)

    def init(client_input, key):
      del client_input, key
      return zero_grad, jnp.zeros((), jnp.float32)

    def step(carry, batch, mask, key):
      grad_sum, count = carry
      rng = key if model.uses_rng else None
      grads, step_metrics = _client_work.masked_grad(model, model_weights, batch, mask, rng)
      n = jnp.sum(mask > 0).astype(jnp.float32)
      return (jax.tree.map(lambda s, g: s + n * g, grad_sum, grads), count + n), step_metrics

    def finalize(carry):
      grad_sum, count = carry
      mean_grad = jax.tree.map(lambda g: g / jnp.maximum(count, 1.0), grad_sum)
      return _client_work.ClientOutput(update=mean_grad)

    return _client_work.ClientLoop(init, step, finalize)

  return client_loop


def build_fed_sgd(
  model: models.FunctionalModel,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """FedSGD: each client computes the gradient of its mean loss at the global weights, the
  server averages the gradients weighted by examples and takes one `server_optimizer` step
  (default `build_sgdm(0.1)`). With one client this is plain (full-batch) gradient descent.

  Example:
    >>> process = fl.algorithms.build_fed_sgd(model, fl.optimizers.build_sgdm(0.5))

  `seed` seeds the per-round keys of models that take an `rng` (dropout).

  Returns:
    A `LearningProcess`; metrics as `build_weighted_fed_avg`'s.
  """
  _client_work.check_model(model)
  server_optimizer = server_optimizer or optimizers.build_sgdm(0.1)
  client_work = _client_work.build_client_work(
    model,
    gradient_client_loop(model),
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(server_optimizer, model.initial_weights)
  return _common.compose(model, client_work, finalizer, model_distributor, model_aggregator)
