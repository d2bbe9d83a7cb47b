"""Federated SGD (McMahan et al., 2017): clients send gradients at the global weights."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lite import metrics as metrics_lib
from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.algorithms import _common
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _client_work, _cohort, _finalizers, _processes


def _build_gradient_client_work(
  model, metrics_aggregator, client_chunk_size, seed=0
) -> _processes.ClientWorkProcess:
  """Client work returning each client's mean gradient over all its real examples."""
  metric_init, metric_update, metric_finalize = _client_work.training_metric_fns(model)
  aggregate_metrics = (metrics_aggregator or metrics_lib.sum_then_finalize)(metric_finalize)
  weighting = _client_work.ClientWeighting.NUM_EXAMPLES

  def initialize():
    return _client_work.ClientWorkState({}, jax.random.PRNGKey(seed))

  def next_fn(state, model_weights, client_batches):
    _client_batches.check_client_batches(client_batches, model.input_spec)
    round_key, next_key = jax.random.split(state.rng)
    zero_grad = tree_lib.tree_zeros_like(model_weights.trainable)

    def init_client(index):
      return zero_grad, metric_init(), jax.random.fold_in(round_key, index)

    def step(carry, batch, mask, step_index):
      grad_sum, metric_state, key = carry
      rng = jax.random.fold_in(key, step_index) if model.uses_rng else None
      n = jnp.sum(mask > 0).astype(jnp.float32)
      grads, metric_state = _client_work.masked_grad_step(
        model,
        model_weights.trainable,
        model_weights.non_trainable,
        batch,
        mask,
        metric_update,
        metric_state,
        rng,
      )
      return jax.tree.map(lambda s, g: s + n * g, grad_sum, grads), metric_state, key

    def finalize_client(carry):
      grad_sum, metric_state, _ = carry
      n = metric_state['builtin']['num_examples'].astype(jnp.float32)
      mean_grad = jax.tree.map(lambda g: g / jnp.maximum(n, 1.0), grad_sum)
      return _client_work.client_result(mean_grad, metric_state, weighting, metric_finalize)

    outputs = _cohort.run_clients(
      init_client, step, finalize_client, client_batches, client_chunk_size
    )
    return _client_work.client_work_output(state._replace(rng=next_key), outputs, aggregate_metrics)

  return _processes.ClientWorkProcess(initialize, next_fn)


def build_fed_sgd(
  model: models.FunctionalModel,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | None = None,
) -> _processes.LearningProcess:
  """FedSGD: each client computes the gradient of its mean loss at the global weights, the
  server averages the gradients weighted by examples and takes one `server_optimizer` step
  (default `build_sgdm(0.1)`). With one client this is plain (full-batch) gradient descent.

  Example:
    >>> process = fl.algorithms.build_fed_sgd(model, fl.optimizers.build_sgdm(0.5))

  Returns:
    A `LearningProcess`; metrics as `build_weighted_fed_avg`'s.
  """
  _client_work.check_model(model)
  _cohort.check_chunk_size(client_chunk_size)
  server_optimizer = server_optimizer or optimizers.build_sgdm(0.1)
  client_work = _build_gradient_client_work(model, metrics_aggregator, client_chunk_size)
  finalizer = _finalizers.build_apply_optimizer_finalizer(server_optimizer, model.initial_weights)
  return _common.compose(model, client_work, finalizer, model_distributor, model_aggregator)
