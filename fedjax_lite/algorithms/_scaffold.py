"""SCAFFOLD (Karimireddy et al., 2020, "SCAFFOLD: Stochastic Controlled Averaging for Federated
Learning"), option II: local SGD corrected by control variates, one per client and one on the
server.

The per-client control variates c_i are the process's client states: they come in as the client
work's per-client inputs and leave as its per-client outputs, and live between rounds in a store
keyed by client id (`fl.simulation.InMemoryClientStateStore`, `SQLiteClientStateStore`), which
`fl.simulation.run_training_process` threads through the rounds. The server control variate c
lives in the client work's state and reaches every client as the round's broadcast value; the
Δc of the clients is their `client_sum`, summed inside the cohort loop beside the aggregator's
Δy contributions.

The c_i and c belong together: a run resumed with c from its checkpoint and the c_i restarted at
zero (a store deleted, emptied or older than the checkpoint) trains a different algorithm. The
stores record the rounds they committed and check every state's checksum, so such a resume, or
a damaged state, is refused (`fl.simulation.ClientStateStoreError`), never run.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_lite import aggregators, models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _finalizers, _processes

LEARNING_RATE = 'learning_rate'
POPULATION_SIZE = 'population_size'


class ScaffoldState(NamedTuple):
  """State of SCAFFOLD's client work.

  Attributes:
    control_variate: the server control variate c, shaped like the trainable weights; every
      client of a round receives it as the client work's broadcast value.
    client_work: the `ClientWorkState` of the local training; its hparams are
      `{'learning_rate': η_l, 'population_size': N}`.
  """

  control_variate: Any
  client_work: _client_work.ClientWorkState


def _scaffold_client_loop(model: models.FunctionalModel):
  """Local SGD `y ← y − η_l·(g(y) − c_i + c)` from the broadcast x, c the broadcast value; the
  new control variate `c_i+ = c_i − c + (x − y)/(K·η_l)`, K the client's real steps (a client
  with none keeps c_i). The update is `x − y`, the client sum `c_i+ − c_i`, the output c_i+."""

  def client_loop(model_weights, hparams, control_variate):
    x, c, lr = model_weights.trainable, control_variate, hparams[LEARNING_RATE]

    def init(client_control, key):
      del key
      return model_weights, client_control, jnp.zeros((), jnp.int32)

    def step(carry, batch, mask, key):
      weights, client_control, steps = carry
      rng = key if model.uses_rng else None
      grads, step_metrics = _client_work.masked_grad(model, weights, batch, mask, rng)
      y = jax.tree.map(
        lambda y, g, ci, c: y - lr * (g - ci + c), weights.trainable, grads, client_control, c
      )
      return (weights._replace(trainable=y), client_control, steps + 1), step_metrics

    def finalize(carry):
      weights, client_control, steps = carry
      delta = tree_lib.tree_sub(x, weights.trainable)
      scale = jnp.where(steps > 0, 1.0 / (jnp.maximum(steps, 1) * lr), 0.0)
      new_control = jax.tree.map(
        lambda ci, c, d: jnp.where(steps > 0, ci - c + scale * d, ci), client_control, c, delta
      )
      control_delta = tree_lib.tree_sub(new_control, client_control)
      # A client that build_client_work excludes as non-finite keeps its control variate.
      ok = tree_lib.tree_all_finite((delta, control_delta))
      return _client_work.ClientOutput(
        update=delta,
        client_output=tree_lib.tree_where(ok, new_control, client_control),
        model_weights=weights,
        client_sum=control_delta,
      )

    return _client_work.ClientLoop(init, step, finalize)

  return client_loop


def _scaffold_client_work(model, hparams, **client_work_kwargs) -> _processes.ClientWorkProcess:
  """Runs the local loop with c broadcast, hands Δy to the aggregator and moves c by ΣΔc / N."""
  work = _client_work.build_client_work(
    model, _scaffold_client_loop(model), hparams, **client_work_kwargs
  )
  zeros = tree_lib.tree_zeros_like(model.initial_weights.trainable)

  def initialize():
    return ScaffoldState(tree_lib.tree_strong_types(zeros), work.initialize())

  def next_fn(state, model_weights, client_batches, client_inputs=(), *, client_part=None):
    out = work.next(
      state.client_work,
      model_weights,
      client_batches,
      client_inputs,
      client_part=client_part,
      broadcast=state.control_variate,
    )
    population = state.client_work.hparams[POPULATION_SIZE]
    control = jax.tree.map(
      lambda c, s: c + s / population, state.control_variate, out.result.client_sum
    )
    result = out.result._replace(client_sum=())
    return _processes.MeasuredProcessOutput(
      ScaffoldState(control, out.state), result, out.measurements
    )

  def get_hparams(state):
    return work.get_hparams(state.client_work)

  def set_hparams(state, hparams):
    return state._replace(client_work=work.set_hparams(state.client_work, hparams))

  return _client_work.wrap_client_work(work, initialize, next_fn, get_hparams, set_hparams)


def _check_positive(name: str, value: Any, kinds: tuple = (int, float, np.number)) -> None:
  if (
    isinstance(value, bool) or not isinstance(value, kinds) or not np.isfinite(value) or value <= 0
  ):
    what = 'an int >= 1' if kinds == (int, np.integer) else 'a finite number > 0'
    raise ValueError(f'{name} must be {what}; got {value!r}')


def build_scaffold(
  model: models.FunctionalModel,
  client_learning_rate: float,
  server_learning_rate: float = 1.0,
  *,
  population_size: int,
  client_weighting: _client_work.ClientWeighting | Callable = (
    _client_work.ClientWeighting.UNIFORM
  ),
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """SCAFFOLD (Karimireddy et al., 2020), option II, as a stateful `LearningProcess`.

  Each sampled client i, starting from the broadcast x with its control variate c_i (zeros for
  a client never seen) and the server's c, takes K local SGD steps `y ← y − η_l·(g(y) − c_i +
  c)` (K its real batches), then sets `c_i+ = c_i − c + (x − y)/(K·η_l)`. The server applies
  `x ← x + η_g·mean(y − x)` (weighted by `client_weighting`; uniform in the paper) and
  `c ← c + (|S|/N)·mean(c_i+ − c_i) = c + Σ_S (c_i+ − c_i) / N`, N the population size. A client
  with no examples, or excluded for a non-finite update, keeps its c_i.

  The process is stateful: `initial_client_state` is zeros like the trainable weights and
  `next(state, client_batches, client_states) -> StatefulLearningProcessOutput(state, metrics,
  client_states)` takes and returns the cohort's c_i `[clients, ...]`. Run it with
  `fl.simulation.run_training_process(..., client_state_store=, cohort_ids_fn=)`.

  Example:
    >>> process = fl.algorithms.build_scaffold(model, 0.1, population_size=3400)
    >>> store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
    >>> ids = ['f0001', 'f0002']
    >>> state, metrics, controls = process.next(
    ...     process.initialize(), client_batches, store.get(ids))
    >>> store.put(ids, controls)

  Args:
    model: a `FunctionalModel`.
    client_learning_rate: η_l, local SGD's step (hparam `client_work/learning_rate`).
    server_learning_rate: η_g (the finalizer's SGD, hparam `finalizer/learning_rate`).
    population_size: N, the number of clients c averages over (hparam
      `client_work/population_size`, a float in state).
    client_weighting: weights of the Δy mean; default `UNIFORM` as in the paper (`NUM_EXAMPLES`
      weights by examples as FedAvg does).
    model_distributor, model_aggregator, metrics_aggregator, client_chunk_size, mesh, seed: as
      `build_weighted_fed_avg`; the default aggregator is `MeanFactory()`.

  Returns:
    A stateful `LearningProcess`; metrics as `build_weighted_fed_avg`'s.
  """
  _check_positive('client_learning_rate', client_learning_rate)
  _check_positive('server_learning_rate', server_learning_rate)
  _check_positive('population_size', population_size, (int, np.integer))
  _client_work.check_model(model)
  hparams = {
    LEARNING_RATE: jnp.asarray(client_learning_rate, jnp.float32),
    POPULATION_SIZE: jnp.asarray(population_size, jnp.float32),
  }
  client_work = _scaffold_client_work(
    model,
    hparams,
    client_weighting=client_weighting,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(
    optimizers.build_sgdm(server_learning_rate), model.initial_weights
  )
  return _common.compose(
    model,
    client_work,
    finalizer,
    model_distributor,
    model_aggregator or aggregators.MeanFactory(),
    initial_client_state=tree_lib.tree_zeros_like(model.initial_weights.trainable),
  )
