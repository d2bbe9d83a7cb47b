"""Federated Reconstruction's client work: reconstruct local weights, then train global ones.

A round runs as one program. Reconstruction is one `run_clients` pass (chunks of vmapped clients,
a loop over each chunk's reconstruction steps) that trains only the local trainables and returns
every client's local weights `[clients, ...]`; post-reconstruction is a second pass, each client
starting from its own reconstructed locals, that trains the global trainables (and, jointly
trained, the locals too) and returns the update of the global trainables. Each pass is sorted and
chunked by its own step counts, so neither walks the other's padding, and reconstruction never
computes gradients of the global weights. The local weights stay inside the round: only the
update, its weight and summed metrics leave the client work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite import metrics as metrics_lib
from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.reconstruction import _dataset_split, _model
from fedjax_lite.templates import _client_work, _cohort, _processes


class GlobalModel(NamedTuple):
  """The server's view of a `ReconstructionModel` for `algorithms._common.compose`: the global
  weights only (local leaves masked)."""

  initial_weights: Any
  input_spec: Any


# Keys folded into the round key: one stream per use, then the client's position in the cohort.
_INIT_STREAM, _RECON_STREAM, _POST_STREAM = 0, 1, 2


class _PhaseModel:
  """What `masked_forward` sees in one phase: `weights.trainable` is the part being trained,
  `weights.non_trainable` the frozen rest, and `assemble(trainable, frozen)` the full weights."""

  def __init__(self, model: models.FunctionalModel, assemble: Callable[[Any, Any], Any]):
    self._model = model
    self._assemble = assemble

  def predict_on_batch(self, weights, x, training=True, rng=None):
    full = self._assemble(weights.trainable, weights.non_trainable)
    return self._model.predict_on_batch(full, x, training, rng=rng)

  def loss(self, output, label, sample_weight=None):
    return self._model.loss(output, label, sample_weight)


def check_reconstruction_model(model: Any) -> None:
  if not isinstance(model, _model.ReconstructionModel):
    raise TypeError(
      f'model must be a fl.reconstruction.ReconstructionModel; got {type(model).__name__}. '
      'Tip: fl.reconstruction.ReconstructionModel(functional_model, partition).'
    )


def _check_loss_fn(loss_fn: Any) -> None:
  if not callable(loss_fn):
    raise TypeError(f'loss_fn must be callable; got {type(loss_fn).__name__}')
  try:
    inspect.signature(loss_fn).bind(None, None, None)
  except TypeError:
    raise TypeError(
      'loss_fn must take (predictions, labels, sample_weight) and return the [] mean loss '
      f'weighted by sample_weight; its signature is {inspect.signature(loss_fn)}'
    ) from None
  except ValueError:  # builtins without a signature: let the trace below judge
    pass


def _abstract_batch(input_spec: Any) -> Any:
  """One batch of size 1 as `jax.ShapeDtypeStruct`s."""
  return jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(tuple(1 if d is None else d for d in s.shape), s.dtype),
    input_spec,
  )


def training_model(
  model: _model.ReconstructionModel, loss_fn: Callable | None, metrics_fns: Any
) -> models.FunctionalModel:
  """The partitioned model as one `FunctionalModel` with the builder's loss and metrics.

  `loss_fn=None` / `metrics_fns=None` keep the model's own. The loss is checked by abstract
  evaluation on a batch of `input_spec`: it must return a scalar.
  """
  check_reconstruction_model(model)
  inner = model.model
  if loss_fn is None and metrics_fns is None:
    return inner
  if loss_fn is not None:
    _check_loss_fn(loss_fn)
  if inner.uses_rng:

    def predict(weights, x, training=True, rng=None):
      return inner.predict_on_batch(weights, x, training, rng=rng)

  else:

    def predict(weights, x, training=True):
      return inner.predict_on_batch(weights, x, training)

  fm = models.FunctionalModel(
    initial_weights=inner.initial_weights,
    predict_on_batch_fn=predict,
    loss_fn=loss_fn or inner.loss,
    metrics_fns=metrics_fns if metrics_fns is not None else _model_metrics(inner),
    input_spec=inner.input_spec,
  )
  x, y = models.split_batch(_abstract_batch(inner.input_spec))
  batch_size = jax.tree.leaves(y)[0].shape[0]

  def batch_loss(x, y):
    return fm.loss(fm.predict_on_batch(inner.initial_weights, x, True), y, jnp.ones(batch_size))

  try:
    loss = jax.eval_shape(batch_loss, x, y)
  except TypeError as e:
    raise TypeError(f'loss_fn(predictions, labels, sample_weight) failed on a batch: {e}') from e
  if getattr(loss, 'shape', None) != ():
    raise ValueError(
      f'loss_fn must return a [] scalar (the mean over the batch); it returned {loss}'
    )
  return fm


def _model_metrics(model: models.FunctionalModel) -> tuple[Callable, Callable, Callable]:
  return (model.initialize_metrics_state, model.update_metrics_state, model.finalize_metrics)


def check_split_output(out: Any, client_batches: _client_batches.ClientBatches) -> None:
  """Raises if a dataset split function did not return two `ClientBatches` like its input."""
  if not (isinstance(out, tuple) and len(out) == 2):
    raise TypeError(
      'dataset_split_fn must return (reconstruction, post_reconstruction) ClientBatches; got '
      f'{type(out).__name__}'
    )
  num_clients = client_batches.mask.shape[0]
  for name, part in zip(('reconstruction', 'post-reconstruction'), out, strict=True):
    if not isinstance(part, _client_batches.ClientBatches):
      raise TypeError(
        f'dataset_split_fn returned a {type(part).__name__} as its {name} part; expected '
        'ClientBatches'
      )
    if part.mask.ndim != 3 or part.mask.shape[0] != num_clients:
      raise ValueError(
        f'dataset_split_fn returned a {name} mask of shape {part.mask.shape}; expected '
        f'({num_clients}, steps, batch_size)'
      )


def _no_metrics(state, labels, batch_output, sample_weight):
  del labels, batch_output, sample_weight
  return state


def split_and_reconstruct(
  fm: models.FunctionalModel,
  model: _model.ReconstructionModel,
  optimizer: optax.GradientTransformation,
  hparams: dict,
  global_weights: models.ModelWeights,
  client_batches: _client_batches.ClientBatches,
  dataset_split_fn: _dataset_split.DatasetSplitFn,
  round_key: jax.Array,
  client_chunk_size: int | None,
) -> tuple[Any, _client_batches.ClientBatches]:
  """Splits `client_batches` with `dataset_split_fn` and reconstructs on the first part.

  Returns every client's local weights after reconstruction (leaves `[clients, ...]`) and the
  second part of the split (post-reconstruction training, or evaluation).

  Client `i` initializes its locals from `fold_in(fold_in(round_key, 0), i)` and trains only
  the local trainables, global weights frozen, with a fresh `optimizer` state (hyperparameters
  `hparams`), one step per batch that has data; no metrics are counted. With no local
  trainables the initial locals are returned as they are.
  """
  split = dataset_split_fn(client_batches)
  check_split_output(split, client_batches)
  recon_batches, other_batches = split
  num_clients = recon_batches.mask.shape[0]
  init_key = jax.random.fold_in(round_key, _INIT_STREAM)
  step_key = jax.random.fold_in(round_key, _RECON_STREAM)

  def initial_locals(index):
    return model.initialize_local_weights(jax.random.fold_in(init_key, index))

  if not jax.tree.leaves(model.local_trainable_variables):
    return jax.vmap(initial_locals)(jnp.arange(num_clients)), other_batches
  opt_state = optimizers.set_hparams(optimizer.init(model.local_trainable_variables), hparams)
  # Trained: the local trainables; frozen: the local non-trainables (and the global weights).
  phase = _PhaseModel(
    fm,
    lambda trainable, frozen: _model.merge(global_weights, models.ModelWeights(trainable, frozen)),
  )

  def init_client(index):
    return initial_locals(index), opt_state, jax.random.fold_in(step_key, index)

  def step(carry, batch, mask, step_index):
    local, opt_state, key = carry
    rng = jax.random.fold_in(key, step_index) if fm.uses_rng else None
    grads, _ = _client_work.masked_grad_step(
      phase, local.trainable, local.non_trainable, batch, mask, _no_metrics, (), rng
    )
    updates, opt_state = optimizer.update(grads, opt_state, local.trainable)
    return local._replace(trainable=optax.apply_updates(local.trainable, updates)), opt_state, key

  locals_ = _cohort.run_clients(
    init_client, step, lambda carry: carry[0], recon_batches, client_chunk_size
  )
  return locals_, other_batches


def _hparams(optimizer: optax.GradientTransformation, params: Any) -> dict:
  return optimizers.get_hparams(optimizer.init(params))


def build_reconstruction_client_work(
  model: _model.ReconstructionModel,
  *,
  loss_fn: Callable | None = None,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  client_optimizer: optax.GradientTransformation,
  reconstruction_optimizer: optax.GradientTransformation,
  dataset_split_fn: _dataset_split.DatasetSplitFn,
  client_weighting: _client_work.ClientWeighting | Callable = (
    _client_work.ClientWeighting.NUM_EXAMPLES
  ),
  metrics_aggregator: Callable | None = None,
  jointly_train_variables: bool = False,
  client_chunk_size: int | None = None,
  seed: int = 0,
) -> _processes.ClientWorkProcess:
  """FedRecon's `ClientWorkProcess`: `next(state, global_weights, client_batches)`.

  Per client: split its batches with `dataset_split_fn`; initialize its local weights from a key
  (the round's key, then its position in the cohort); reconstruct them (`reconstruct`); then,
  starting from the broadcast global weights with a fresh `client_optimizer` state, train the
  global trainables on the post-reconstruction batches, locals frozen (or both, when
  `jointly_train_variables`), counting metrics there only. The result is `update = initial −
  final` global trainables, weighted by `client_weighting` of the post-reconstruction examples;
  a non-finite update is zeroed with weight 0 and its metrics dropped.

  State: `ClientWorkState(hparams={'client_optimizer': ..., 'reconstruction_optimizer': ...},
  rng)`. Measurements: `{'train': {'loss', 'num_examples', ...}, 'non_finite_clients'}`.
  """
  fm = training_model(model, loss_fn, metrics_fns)
  _client_work.check_optimizer(client_optimizer, 'client_optimizer')
  _client_work.check_optimizer(reconstruction_optimizer, 'reconstruction_optimizer')
  _client_work.check_client_weighting(client_weighting)
  _cohort.check_chunk_size(client_chunk_size)
  if not callable(dataset_split_fn):
    raise TypeError(f'dataset_split_fn must be callable; got {type(dataset_split_fn).__name__}')
  if not jax.tree.leaves(model.global_trainable_variables):
    raise ValueError(
      'the model has no global trainable weights, so there is nothing to train federatedly; '
      'every trainable leaf is local under the partition. Tip: mark some leaves False (global).'
    )
  metric_init, metric_update, metric_finalize = _client_work.training_metric_fns(fm)
  aggregate_metrics = (metrics_aggregator or metrics_lib.sum_then_finalize)(metric_finalize)
  global_spec = model.initial_global_weights
  local_spec = model.local_trainable_variables
  joint = bool(jointly_train_variables) and bool(jax.tree.leaves(local_spec))
  post_spec = (global_spec.trainable, local_spec) if joint else global_spec.trainable

  def initialize():
    hparams = {
      'client_optimizer': _hparams(client_optimizer, post_spec),
      'reconstruction_optimizer': _hparams(reconstruction_optimizer, local_spec),
    }
    return tree_lib.tree_strong_types(
      _client_work.ClientWorkState(hparams, jax.random.PRNGKey(seed))
    )

  def next_fn(state, global_weights, client_batches):
    _client_batches.check_client_batches(client_batches, model.input_spec)
    round_key, next_key = jax.random.split(state.rng)
    locals_, post_batches = split_and_reconstruct(
      fm,
      model,
      reconstruction_optimizer,
      state.hparams['reconstruction_optimizer'],
      global_weights,
      client_batches,
      dataset_split_fn,
      round_key,
      client_chunk_size,
    )
    post_key = jax.random.fold_in(round_key, _POST_STREAM)
    initial = global_weights.trainable
    if joint:
      # Trained: (global trainables, local trainables); frozen: the local non-trainables.
      def assemble(trainable, frozen):
        return _model.merge(
          global_weights._replace(trainable=trainable[0]),
          models.ModelWeights(trainable[1], frozen),
        )
    else:
      # Trained: the global trainables; frozen: all local weights.
      def assemble(trainable, frozen):
        return _model.merge(global_weights._replace(trainable=trainable), frozen)

    phase = _PhaseModel(fm, assemble)
    start = (initial, local_spec) if joint else initial
    opt_state = optimizers.set_hparams(
      client_optimizer.init(start), state.hparams['client_optimizer']
    )

    def init_client(index):
      local = jax.tree.map(lambda x: x[index], locals_)
      trainable, frozen = (
        ((initial, local.trainable), local.non_trainable)
        if joint
        else (
          initial,
          local,
        )
      )
      return trainable, frozen, opt_state, metric_init(), jax.random.fold_in(post_key, index)

    def step(carry, batch, mask, step_index):
      trainable, frozen, opt_state, metric_state, key = carry
      rng = jax.random.fold_in(key, step_index) if fm.uses_rng else None
      grads, metric_state = _client_work.masked_grad_step(
        phase, trainable, frozen, batch, mask, metric_update, metric_state, rng
      )
      updates, opt_state = client_optimizer.update(grads, opt_state, trainable)
      return optax.apply_updates(trainable, updates), frozen, opt_state, metric_state, key

    def finalize_client(carry):
      trainable, _, _, metric_state, _ = carry
      final = trainable[0] if joint else trainable
      update = tree_lib.tree_sub(initial, final)
      return _client_work.client_result(update, metric_state, client_weighting, metric_finalize)

    outputs = _cohort.run_clients(
      init_client, step, finalize_client, post_batches, client_chunk_size
    )
    return _client_work.client_work_output(state._replace(rng=next_key), outputs, aggregate_metrics)

  return _processes.ClientWorkProcess(initialize, next_fn, get_hparams, set_hparams)


def get_hparams(state: Any) -> dict:
  """`state.hparams`, one dict per optimizer (`{'reconstruction_optimizer': {...}, ...}`)."""
  return {name: dict(h) for name, h in state.hparams.items()}


def set_hparams(state: Any, hparams: dict) -> Any:
  """`state` with some optimizers' hyperparameters replaced (cast as they were: no retrace)."""
  unknown = sorted(set(hparams) - set(state.hparams))
  if unknown:
    raise ValueError(
      f'hparams has unknown keys {unknown}; expected some of {sorted(state.hparams)}'
    )
  new = {
    name: optimizers.replace_hparams(current, hparams.get(name, {}))
    for name, current in state.hparams.items()
  }
  return state._replace(hparams=new)
