"""Mime and MimeLite (Karimireddy et al., 2021, "Breaking the centralized barrier for
cross-device federated learning"): clients apply a base optimizer with the server's optimizer
state frozen; the server moves that state with the clients' full-batch gradients at the
broadcast weights. Mime also corrects each local gradient with a control variate.

A round runs two passes of `build_client_work` over the same data: the full-gradient pass
(FedSGD's client loop, its weighted mean streamed) and the training pass, whose clients receive
the base optimizer's state (and Mime's control variate) as the round's broadcast value. That
state lives in the client work's state; the server part of the round updates it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_lite import aggregators, models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.algorithms import _common, _fed_sgd
from fedjax_lite.templates import _client_work, _finalizers, _processes


class MimeState(NamedTuple):
  """State of Mime's and MimeLite's client work.

  Attributes:
    optimizer_state: the base optimizer's state; clients use it frozen, the server updates it
      with the mean full-batch gradient after each round.
    full_gradient: the full-gradient pass's `ClientWorkState`.
    train: the training pass's `ClientWorkState`.
  """

  optimizer_state: Any
  full_gradient: _client_work.ClientWorkState
  train: _client_work.ClientWorkState


def _train_client_loop(model: models.FunctionalModel, base_optimizer: optax.GradientTransformation):
  """Local steps of `base_optimizer` from the broadcast `(optimizer_state, control_variate)`,
  the state never updated. With a control variate c (Mime; `()` for MimeLite), the gradient at
  y is `g(y) − g(x) + c` on each batch, x the broadcast weights."""

  def client_loop(model_weights, hparams, broadcast):
    del hparams  # the base optimizer's hyperparameters are in its broadcast state
    initial = model_weights.trainable
    opt_state, control_variate = broadcast

    def step(weights, batch, mask, key):
      rng = key if model.uses_rng else None
      grads, step_metrics = _client_work.masked_grad(model, weights, batch, mask, rng)
      if jax.tree.leaves(control_variate):
        at_start, _ = _client_work.masked_grad(model, model_weights, batch, mask, rng)
        grads = jax.tree.map(lambda g, g0, c: g - g0 + c, grads, at_start, control_variate)
      updates, _ = base_optimizer.update(grads, opt_state, weights.trainable)
      return weights._replace(
        trainable=optax.apply_updates(weights.trainable, updates)
      ), step_metrics

    def finalize(weights):
      return _client_work.ClientOutput(update=tree_lib.tree_sub(initial, weights.trainable))

    return _client_work.ClientLoop(lambda client_input, key: model_weights, step, finalize)

  return client_loop


def _mime_client_work(
  model: models.FunctionalModel,
  base_optimizer: optax.GradientTransformation,
  use_control_variate: bool,
  **client_work_kwargs: Any,
) -> _processes.ClientWorkProcess:
  """Full-gradient pass, training pass (with the mean full gradient as control variate when
  `use_control_variate`), then the base optimizer's state moved by the mean full gradient."""
  _client_work.check_optimizer(base_optimizer, 'base_optimizer')
  metrics_aggregator = client_work_kwargs.pop('metrics_aggregator')
  gradient_pass = _client_work.build_client_work(
    model, _fed_sgd.gradient_client_loop(model), **client_work_kwargs
  )
  train_pass = _client_work.build_client_work(
    model,
    _train_client_loop(model, base_optimizer),
    metrics_aggregator=metrics_aggregator,
    **client_work_kwargs,
  )
  trainable = model.initial_weights.trainable

  def initialize():
    opt_state = tree_lib.tree_strong_types(base_optimizer.init(trainable))
    return MimeState(opt_state, gradient_pass.initialize(), train_pass.initialize())

  def weighted(update, weight, client_id):
    del client_id
    return jax.tree.map(lambda g: weight * g, update), weight

  def next_fn(state, model_weights, client_batches, client_inputs=(), *, client_part=None):
    grads = gradient_pass.next(
      state.full_gradient, model_weights, client_batches, client_part=weighted
    )
    grad_sum, total_weight = grads.result.accumulated
    mean_grad = jax.tree.map(lambda g: g / jnp.maximum(total_weight, 1e-30), grad_sum)
    trained = train_pass.next(
      state.train,
      model_weights,
      client_batches,
      client_inputs,
      client_part=client_part,
      broadcast=(state.optimizer_state, mean_grad if use_control_variate else ()),
    )
    _, moved = base_optimizer.update(mean_grad, state.optimizer_state, model_weights.trainable)
    ok = (total_weight > 0) & tree_lib.tree_all_finite(mean_grad)
    new_state = MimeState(
      tree_lib.tree_where(ok, moved, state.optimizer_state),
      grads.state,
      trained.state,
    )
    return _processes.MeasuredProcessOutput(new_state, trained.result, trained.measurements)

  def get_hparams(state):
    return optimizers.get_hparams(state.optimizer_state)

  def set_hparams(state, hparams):
    return state._replace(optimizer_state=optimizers.set_hparams(state.optimizer_state, hparams))

  return _client_work.wrap_client_work(train_pass, initialize, next_fn, get_hparams, set_hparams)


def _build(
  model, base_optimizer, server_optimizer, use_control_variate, client_weighting, **kwargs
) -> _processes.LearningProcess:
  _client_work.check_model(model)
  model_distributor = kwargs.pop('model_distributor')
  model_aggregator = kwargs.pop('model_aggregator')
  client_work = _mime_client_work(
    model, base_optimizer, use_control_variate, client_weighting=client_weighting, **kwargs
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(
    server_optimizer or optimizers.build_sgdm(1.0), model.initial_weights
  )
  return _common.compose(model, client_work, finalizer, model_distributor, model_aggregator)


def build_weighted_mime_lite(
  model: models.FunctionalModel,
  base_optimizer: optax.GradientTransformation,
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
  """MimeLite (Karimireddy et al., 2021), TFF's `tff.learning.algorithms.build_weighted_mime_lite`.

  Each round: every client computes its full-batch gradient at the broadcast weights x and
  trains with `base_optimizer` from the server's base-optimizer state s, applied without
  updating s; the server averages the deltas (weighted by `client_weighting`) into the model
  with `server_optimizer` (SGD 1.0 by default) and moves s with one `base_optimizer` step on the
  weighted mean full gradient. Client-work hparams are the base optimizer's.

  Example:
    >>> process = fl.algorithms.build_weighted_mime_lite(
    ...     model, base_optimizer=fl.optimizers.build_sgdm(0.1, momentum=0.9))

  Args:
    model: a `FunctionalModel`.
    base_optimizer: optax transformation whose state the server keeps (momentum, Adam moments).
    server_optimizer: applied to the averaged delta; default `build_sgdm(1.0)`.
    client_weighting, model_distributor, model_aggregator, metrics_aggregator,
      client_chunk_size, mesh, seed: as `build_weighted_fed_avg`. The full gradients are
      averaged with the same client weights (TFF's `full_gradient_aggregator` is not offered).
  """
  return _build(
    model,
    base_optimizer,
    server_optimizer,
    False,
    client_weighting,
    model_distributor=model_distributor,
    model_aggregator=model_aggregator,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )


def build_unweighted_mime_lite(
  model: models.FunctionalModel,
  base_optimizer: optax.GradientTransformation,
  server_optimizer: optax.GradientTransformation | None = None,
  *,
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """MimeLite (Karimireddy et al., 2021) where every client that trained counts once (deltas and
  full gradients), TFF's `build_unweighted_mime_lite`; weighting as `build_unweighted_fed_avg`,
  arguments as `build_weighted_mime_lite`."""
  return _build(
    model,
    base_optimizer,
    server_optimizer,
    False,
    _client_work.ClientWeighting.UNIFORM,
    model_distributor=model_distributor,
    model_aggregator=model_aggregator or aggregators.MeanFactory(),
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )


def build_mime(
  model: models.FunctionalModel,
  base_optimizer: optax.GradientTransformation,
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
  """Mime (Karimireddy et al., 2021) as FedJAX's `fedjax.algorithms.mime` has it (TFF has none).

  MimeLite plus a control variate: the mean full-batch gradient c at the broadcast weights x is
  computed over the cohort first, then each local step uses `g(y) − g(x) + c` on its batch
  (both gradients on the same batch and dropout key) with the frozen base-optimizer state. The
  server then averages the deltas with `server_optimizer` (FedJAX's `server_learning_rate` is
  `build_sgdm(server_learning_rate)`) and moves the base-optimizer state with c.
  A local step costs two gradients, and the round a third pass for c.

  Example:
    >>> process = fl.algorithms.build_mime(model, fl.optimizers.build_sgdm(0.1, momentum=0.9))

  Arguments as `build_weighted_mime_lite`.
  """
  return _build(
    model,
    base_optimizer,
    server_optimizer,
    True,
    client_weighting,
    model_distributor=model_distributor,
    model_aggregator=model_aggregator,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
