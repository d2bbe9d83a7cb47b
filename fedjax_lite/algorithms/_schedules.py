"""FedAvg whose client learning rate follows a schedule over rounds, TFF's
`build_weighted_fed_avg_with_optimizer_schedule`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_lite import models, optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _finalizers, _processes

LEARNING_RATE = 'learning_rate'


class ScheduledClientWorkState(NamedTuple):
  """State of the scheduled client work.

  Attributes:
    round_num: `[] int32` rounds run so far; this round's client learning rate,
      `client_learning_rate_fn(round_num)`, is broadcast to its clients.
    client_work: the model-delta client work's state; its hparams are the client optimizer's
      other hyperparameters (the learning rate is not one: the schedule sets it).
  """

  round_num: jax.Array
  client_work: _client_work.ClientWorkState


def _scheduled_client_work(
  model: models.FunctionalModel,
  learning_rate_fn: Callable[[jax.Array], Any],
  optimizer: optax.GradientTransformation,
  **client_work_kwargs: Any,
) -> _processes.ClientWorkProcess:
  """FedAvg's client work whose clients receive `learning_rate_fn(round_num)` as the round's
  broadcast value and train with it as the optimizer's learning rate."""
  _client_work.check_optimizer(optimizer, 'client_optimizer_fn(learning_rate)')
  hparams = optimizers.get_hparams(optimizer.init(model.initial_weights.trainable))
  if LEARNING_RATE not in hparams:
    raise TypeError(
      'client_optimizer_fn(learning_rate) must return an optimizer with a learning_rate '
      f'hyperparameter (e.g. fl.optimizers.build_sgdm); its hparams are {sorted(hparams)}'
    )
  lr_dtype = hparams.pop(LEARNING_RATE).dtype
  delta_loop = _client_work.model_delta_client_loop(model, optimizer)

  def client_loop(model_weights, hparams, learning_rate):
    return delta_loop(model_weights, {**hparams, LEARNING_RATE: learning_rate})

  work = _client_work.build_client_work(model, client_loop, hparams, **client_work_kwargs)

  def initialize():
    return ScheduledClientWorkState(jnp.zeros([], jnp.int32), work.initialize())

  def next_fn(state, model_weights, client_batches, client_inputs=(), *, client_part=None):
    lr = jnp.asarray(learning_rate_fn(state.round_num), lr_dtype)
    out = work.next(
      state.client_work,
      model_weights,
      client_batches,
      client_inputs,
      client_part=client_part,
      broadcast=lr,
    )
    new_state = ScheduledClientWorkState(state.round_num + 1, out.state)
    measurements = {**out.measurements, 'client_learning_rate': lr}
    return _processes.MeasuredProcessOutput(new_state, out.result, measurements)

  def get_hparams(state):
    return work.get_hparams(state.client_work)

  def set_hparams(state, hparams):
    if LEARNING_RATE in hparams:
      raise ValueError(
        "hparams['learning_rate'] is set every round by client_learning_rate_fn(round_num); "
        "set_hparams cannot change it. Tip: change the schedule, or set the state's round_num."
      )
    return state._replace(client_work=work.set_hparams(state.client_work, hparams))

  return _client_work.wrap_client_work(work, initialize, next_fn, get_hparams, set_hparams)


def build_weighted_fed_avg_with_optimizer_schedule(
  model: models.FunctionalModel,
  client_learning_rate_fn: Callable[[jax.Array], Any],
  client_optimizer_fn: Callable[[float], optax.GradientTransformation],
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
  """FedAvg (McMahan et al., 2017) with the client learning rate scheduled over rounds, TFF's
  `tff.learning.algorithms.build_weighted_fed_avg_with_optimizer_schedule`.

  Round `r` (from 0) trains the clients with `client_optimizer_fn(lr)` at
  `lr = client_learning_rate_fn(r)`. The round number is in state
  (`state.client_work.round_num`), so the schedule is one compiled round: the function is
  traced with a `[] int32` round number (`lambda r: 0.1 * 0.99**r` and optax schedules work).
  `client_optimizer_fn` is called once, with `client_learning_rate_fn(0)`; the learning rate is
  then set in its state each round. Measurements add `client_learning_rate`, as TFF's.

  Example:
    >>> process = fl.algorithms.build_weighted_fed_avg_with_optimizer_schedule(
    ...     model, optax.exponential_decay(0.1, 10, 0.5), fl.optimizers.build_sgdm)

  Args:
    model: a `FunctionalModel`.
    client_learning_rate_fn: `(round_num [] int32) -> [] learning rate`, traceable.
    client_optimizer_fn: `(learning_rate) -> optax transformation` whose hparams hold a
      `learning_rate` (every `fl.optimizers` builder).
    server_optimizer: default `build_sgdm(1.0)`.
    client_weighting, model_distributor, model_aggregator, metrics_aggregator,
      client_chunk_size, mesh, seed: as `build_weighted_fed_avg`.

  Returns:
    A `LearningProcess`. Its client-work hparams are the client optimizer's other
    hyperparameters; setting `learning_rate` raises `ValueError` (the schedule owns it).
  """
  _client_work.check_model(model)
  if not callable(client_learning_rate_fn) or not callable(client_optimizer_fn):
    raise TypeError('client_learning_rate_fn and client_optimizer_fn must be callables')
  client_optimizer = client_optimizer_fn(float(client_learning_rate_fn(0)))
  client_work = _scheduled_client_work(
    model,
    client_learning_rate_fn,
    client_optimizer,
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
