"""`build_model_delta_client_work`: FedAvg's local training for a whole cohort in one call."""

from __future__ import annotations

import enum
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite import metrics as metrics_lib
from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _cohort, _processes


class ClientWeighting(enum.Enum):
  """How a client's update is weighted in the aggregate.

  NUM_EXAMPLES: the real examples it trained on (E epochs of n examples count E·n).
  UNIFORM: 1 for every client that trained on at least one example (0 for an empty client).
  """

  NUM_EXAMPLES = 'num_examples'
  UNIFORM = 'uniform'


class ClientWorkState(NamedTuple):
  """Server-side state of the client work built here and by the algorithms.

  Attributes:
    hparams: the client optimizer's hyperparameters, e.g. `{'learning_rate': [] float32}`
      (`{}` when there is no client optimizer).
    rng: `[2] uint32` key of this round's randomness (used when the model takes an `rng`).
  """

  hparams: dict
  rng: jax.Array


def masked_batch(batch: Any, mask: jax.Array) -> Any:
  """Zeroes the padded examples of `batch` (leaves `[batch_size, ...]`) so junk cannot leak."""

  def zero(x):
    m = jnp.reshape(mask > 0, mask.shape + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree.map(zero, batch)


def masked_forward(model, weights, batch, mask, training, rng=None):
  """`(loss [], (BatchOutput, labels))` of one padded batch, padding masked out of everything.

  The labels are the batch's, padded rows zeroed, ready for the metric update.
  """
  x, y = models.split_batch(masked_batch(batch, mask))
  predictions = model.predict_on_batch(weights, x, training, rng=rng)
  loss = model.loss(predictions, y, mask)
  num_examples = jnp.sum(mask > 0).astype(jnp.int32)
  return loss, (models.BatchOutput(predictions, loss, num_examples), y)


def masked_grad_step(
  model, trainable, non_trainable, batch, mask, metric_update, metric_state, rng
):
  """One training forward/backward pass on a padded batch.

  Returns:
    `(grads, metric_state)`: gradients of the masked loss with respect to `trainable`, and the
    metric state updated with this batch's output (computed before any weight changes).
  """

  def loss_fn(trainable):
    weights = models.ModelWeights(trainable, non_trainable)
    return masked_forward(model, weights, batch, mask, True, rng)

  (_, (batch_output, y)), grads = jax.value_and_grad(loss_fn, has_aux=True)(trainable)
  return grads, metric_update(metric_state, y, batch_output, mask)


def training_metric_fns(model) -> tuple[Callable, Callable, Callable]:
  """`loss` and `num_examples`, always reported, plus the model's own metrics (which win)."""
  builtin = metrics_lib.create_functional_metric_fns(
    {'loss': metrics_lib.loss(), 'num_examples': metrics_lib.num_examples()}
  )

  def initialize():
    return {'builtin': builtin[0](), 'model': model.initialize_metrics_state()}

  def update(state, labels, batch_output, sample_weight):
    return {
      'builtin': builtin[1](state['builtin'], labels, batch_output, sample_weight),
      'model': model.update_metrics_state(state['model'], labels, batch_output, sample_weight),
    }

  def finalize(state):
    return {**builtin[2](state['builtin']), **model.finalize_metrics(state['model'])}

  return initialize, update, finalize


def client_weight(
  client_weighting: ClientWeighting | Callable, num_examples: jax.Array, metrics: Any
) -> jax.Array:
  """`[]` float32 weight of one client's update."""
  if client_weighting is ClientWeighting.NUM_EXAMPLES:
    return num_examples.astype(jnp.float32)
  if client_weighting is ClientWeighting.UNIFORM:
    return (num_examples > 0).astype(jnp.float32)
  return jnp.asarray(client_weighting(metrics), jnp.float32)


def check_client_weighting(client_weighting: Any) -> None:
  if not (isinstance(client_weighting, ClientWeighting) or callable(client_weighting)):
    raise TypeError(
      'client_weighting must be a ClientWeighting or a callable of the client metrics; got '
      f'{client_weighting!r}'
    )


def check_model(model: Any) -> None:
  if not isinstance(model, models.FunctionalModel):
    raise TypeError(
      f'model must be a fedjax_lite.FunctionalModel; got {type(model).__name__}. '
      'Tip: wrap a flax module with fl.models.from_flax.'
    )


def check_optimizer(optimizer: Any, name: str) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f'{name} must be an optax.GradientTransformation (e.g. fl.optimizers.build_sgdm(0.1)); '
      f'got {type(optimizer).__name__}'
    )


def client_result(update, metric_state, client_weighting, metric_finalize):
  """One client's `(update, weight, metric_state, non_finite)`, zeroed when not finite.

  A client whose update or weight holds a non-finite value gets a zero update, weight 0 and
  zero (dropped) metrics.
  """
  num_examples = metric_state['builtin']['num_examples']
  weight = client_weight(client_weighting, num_examples, metric_finalize(metric_state))
  ok = tree_lib.tree_all_finite(update) & jnp.isfinite(weight)
  zeros = tree_lib.tree_zeros_like
  return (
    tree_lib.tree_where(ok, update, zeros(update)),
    jnp.where(ok, weight, 0.0),
    tree_lib.tree_where(ok, metric_state, zeros(metric_state)),
    ~ok,
  )


def client_work_output(state, client_outputs, aggregate_metrics):
  """The `MeasuredProcessOutput` of training client work from stacked `client_result`s."""
  update, weight, metric_states, non_finite = client_outputs
  measurements = {
    'train': aggregate_metrics(metric_states),
    'non_finite_clients': jnp.sum(non_finite).astype(jnp.int32),
  }
  return _processes.MeasuredProcessOutput(
    state, _processes.ClientResult(update, weight), measurements
  )


def build_model_delta_client_work(
  model: models.FunctionalModel,
  optimizer: optax.GradientTransformation,
  client_weighting: ClientWeighting | Callable = ClientWeighting.NUM_EXAMPLES,
  metrics_aggregator: Callable | None = None,
  *,
  client_chunk_size: int | None = None,
  seed: int = 0,
) -> _processes.ClientWorkProcess:
  """Client work that trains the broadcast model locally and returns the model delta.

  Every client starts from the same weights with a fresh optimizer state, takes one optimizer
  step per batch over its (padded, masked) steps, and returns `update = initial.trainable -
  final.trainable`. A client whose update holds a non-finite value returns a zero update with
  weight 0 and its metrics are dropped (counted in `measurements['non_finite_clients']`).
  The whole cohort runs in one call: see `_cohort.run_clients`.

  Example:
    >>> work = build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
    >>> out = work.next(work.initialize(), model.initial_weights, client_batches)
    >>> out.result.update  # leaves [clients, ...]

  Args:
    model: the `FunctionalModel` to train.
    optimizer: client optimizer; its hyperparameters are this process's state.
    client_weighting: `ClientWeighting` or `(client metrics) -> [] weight`.
    metrics_aggregator: `(finalize) -> (client metric states [clients, ...]) -> metrics`;
      default `fl.metrics.sum_then_finalize`.
    client_chunk_size: clients vmapped together; default a few on CPU, many on accelerators.
    seed: seeds the per-round keys passed to models that take an `rng`.

  Returns:
    A `ClientWorkProcess`, `next(state, model_weights, client_batches)` with measurements
    `{'train': {'loss', 'num_examples', ...model metrics}, 'non_finite_clients': [] int32}`.
  """
  check_model(model)
  check_optimizer(optimizer, 'optimizer')
  check_client_weighting(client_weighting)
  _cohort.check_chunk_size(client_chunk_size)
  metrics_aggregator = metrics_aggregator or metrics_lib.sum_then_finalize
  metric_init, metric_update, metric_finalize = training_metric_fns(model)
  aggregate_metrics = metrics_aggregator(metric_finalize)
  trainable_spec = model.initial_weights.trainable

  def initialize():
    hparams = optimizers.get_hparams(optimizer.init(trainable_spec))
    return tree_lib.tree_strong_types(ClientWorkState(hparams, jax.random.PRNGKey(seed)))

  def next_fn(state, model_weights, client_batches):
    _client_batches.check_client_batches(client_batches, model.input_spec)
    round_key, next_key = jax.random.split(state.rng)
    initial = model_weights.trainable
    opt_state = optimizers.set_hparams(optimizer.init(initial), state.hparams)

    def init_client(index):
      return initial, opt_state, metric_init(), jax.random.fold_in(round_key, index)

    def step(carry, batch, mask, step_index):
      trainable, opt_state, metric_state, key = carry
      rng = jax.random.fold_in(key, step_index) if model.uses_rng else None
      grads, metric_state = masked_grad_step(
        model,
        trainable,
        model_weights.non_trainable,
        batch,
        mask,
        metric_update,
        metric_state,
        rng,
      )
      updates, opt_state = optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), opt_state, metric_state, key

    def finalize_client(carry):
      trainable, _, metric_state, _ = carry
      update = tree_lib.tree_sub(initial, trainable)
      return client_result(update, metric_state, client_weighting, metric_finalize)

    outputs = _cohort.run_clients(
      init_client, step, finalize_client, client_batches, client_chunk_size
    )
    return client_work_output(state._replace(rng=next_key), outputs, aggregate_metrics)

  def get_hparams(state):
    return dict(state.hparams)

  def set_hparams(state, hparams):
    return state._replace(hparams=optimizers.replace_hparams(state.hparams, hparams))

  return _processes.ClientWorkProcess(initialize, next_fn, get_hparams, set_hparams)
