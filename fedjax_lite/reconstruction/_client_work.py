"""Federated Reconstruction's client work: reconstruct local weights, then train global ones.

A round runs as one program of two client works built with `build_client_work`. The
reconstruction pass trains only the local trainables and returns every client's local weights
as per-client outputs `[clients, ...]`; the post-reconstruction pass takes them as per-client
inputs, trains the global trainables (and, jointly trained, the locals too) and hands the update
of the global trainables to the aggregator. Each pass is sorted and chunked by its own step
counts, so neither walks the other's padding, and reconstruction never computes gradients of
the global weights. The local weights stay inside the round: only the update, its weight and
summed metrics leave the client work.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.reconstruction import _dataset_split, _model
from fedjax_lite.templates import _client_work, _processes


class GlobalModel(NamedTuple):
  """The server's view of a `ReconstructionModel` for `algorithms._common.compose`: the global
  weights only (local leaves masked)."""

  initial_weights: Any
  input_spec: Any


# Keys folded into the round key, one stream per pass; each pass keys its clients by id.
_RECON_STREAM, _POST_STREAM = 1, 2


class _PhaseModel:
  """What `masked_forward` sees in one phase: `weights.trainable` is the part being trained,
  `weights.non_trainable` the frozen rest, and `assemble(trainable, frozen)` the full weights."""

  def __init__(self, model: models.FunctionalModel, assemble: Callable[[Any, Any], Any]):
    self._model = model
    self._assemble = assemble

  @property
  def uses_rng(self) -> bool:
    return self._model.uses_rng

  def predict_on_batch(self, weights, x, training=True, rng=None, mask=None):
    full = self._assemble(weights.trainable, weights.non_trainable)
    return self._model.predict_on_batch(full, x, training, rng=rng, mask=mask)

  def loss(self, output, label, sample_weight=None):
    return self._model.loss(output, label, sample_weight)

  @property
  def uses_forward_pass(self) -> bool:
    return self._model.uses_forward_pass

  def forward_pass(self, weights, batch, training=True, rng=None, mask=None):
    full = self._assemble(weights.trainable, weights.non_trainable)
    return self._model.forward_pass(full, batch, training, rng=rng, mask=mask)


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
  fm = models.FunctionalModel(
    initial_weights=inner.initial_weights,
    predict_on_batch_fn=inner.predict_on_batch_fn,
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
  if isinstance(out, _client_batches.ClientBatches):
    raise TypeError(
      'dataset_split_fn returned one ClientBatches; expected a (reconstruction, '
      'post_reconstruction) pair of ClientBatches'
    )
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


def _hparams(optimizer: optax.GradientTransformation, params: Any) -> dict:
  return optimizers.get_hparams(optimizer.init(params))


def build_reconstruction_pass(
  fm: models.FunctionalModel,
  model: _model.ReconstructionModel,
  optimizer: optax.GradientTransformation,
  client_chunk_size: int | str | None,
  mesh: Mesh | None,
) -> _processes.ClientWorkProcess:
  """Client work whose per-client output is the client's reconstructed local weights.

  A client initializes its locals from its key (round and client id), then trains only the
  local trainables, global weights frozen, with a fresh `optimizer` state (the hyperparameters
  in state), one step per batch that has data; no metrics are counted.
  """
  local_spec = model.local_trainable_variables
  has_local_trainables = bool(jax.tree.leaves(local_spec))

  def client_loop(global_weights, hparams):
    # Trained: the local trainables; frozen: the local non-trainables (and the global weights).
    phase = _PhaseModel(
      fm,
      lambda trainable, frozen: _model.merge(
        global_weights, models.ModelWeights(trainable, frozen)
      ),
    )
    opt_state = optimizers.set_hparams(optimizer.init(local_spec), hparams)

    def init(client_input, key):
      del client_input
      return model.initialize_local_weights(key), opt_state

    def step(carry, batch, mask, key):
      if not has_local_trainables:
        return carry, None
      local, opt_state, _ = _client_work.optimizer_step(phase, optimizer, *carry, batch, mask, key)
      return (local, opt_state), None

    def finalize(carry):
      local = carry[0]
      full = _model.merge(global_weights, local)
      return _client_work.ClientOutput(client_output=local, model_weights=full)

    return _client_work.ClientLoop(init, step, finalize)

  return _client_work.build_client_work(
    fm,
    client_loop,
    _hparams(optimizer, local_spec),
    client_chunk_size=client_chunk_size,
    mesh=mesh,
  )


def reconstruct_round(
  model: _model.ReconstructionModel,
  reconstruction_pass: _processes.ClientWorkProcess,
  dataset_split_fn: _dataset_split.DatasetSplitFn,
  state: _client_work.ClientWorkState,
  global_weights: models.ModelWeights,
  client_batches: _client_batches.ClientBatches,
  client_inputs: Any,
) -> tuple[Any, _client_batches.ClientBatches, jax.Array, jax.Array]:
  """The start of a FedRecon round: checks the inputs, splits `client_batches` with
  `dataset_split_fn` and reconstructs on the first part (`state.hparams[
  'reconstruction_optimizer']`).

  Returns every client's local weights after reconstruction (leaves `[clients, ...]`), the
  second part of the split (post-reconstruction training, or evaluation), the key of the pass
  after reconstruction and the client work's next key.
  """
  if jax.tree.leaves(client_inputs):
    raise ValueError('Federated Reconstruction client work takes no client_inputs')
  _client_batches.check_client_batches(client_batches, model.input_spec)
  round_key, next_key = jax.random.split(state.rng)
  split = dataset_split_fn(client_batches)
  check_split_output(split, client_batches)
  recon_batches, other_batches = split
  recon_state = _client_work.ClientWorkState(
    state.hparams['reconstruction_optimizer'], jax.random.fold_in(round_key, _RECON_STREAM)
  )
  out = reconstruction_pass.next(recon_state, global_weights, recon_batches)
  post_key = jax.random.fold_in(round_key, _POST_STREAM)
  return out.result.client_outputs, other_batches, post_key, next_key


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
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.ClientWorkProcess:
  """FedRecon's `ClientWorkProcess`: `next(state, global_weights, client_batches)`.

  Per client: split its batches with `dataset_split_fn`; initialize its local weights from a key
  (the round's key, then its client id); reconstruct them (`build_reconstruction_pass`); then,
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
  if not callable(dataset_split_fn):
    raise TypeError(f'dataset_split_fn must be callable; got {type(dataset_split_fn).__name__}')
  if not jax.tree.leaves(model.global_trainable_variables):
    raise ValueError(
      'the model has no global trainable weights, so there is nothing to train federatedly; '
      'every trainable leaf is local under the partition. Tip: mark some leaves False (global).'
    )
  global_spec = model.initial_global_weights
  local_spec = model.local_trainable_variables
  joint = bool(jointly_train_variables) and bool(jax.tree.leaves(local_spec))
  post_spec = (global_spec.trainable, local_spec) if joint else global_spec.trainable

  def post_reconstruction_loop(global_weights, hparams):
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
    opt_state = optimizers.set_hparams(client_optimizer.init(start), hparams)

    def init(local, key):
      del key
      if joint:
        return models.ModelWeights((initial, local.trainable), local.non_trainable), opt_state
      return models.ModelWeights(initial, local), opt_state

    def step(carry, batch, mask, key):
      weights, opt_state, step_metrics = _client_work.optimizer_step(
        phase, client_optimizer, *carry, batch, mask, key
      )
      return (weights, opt_state), step_metrics

    def finalize(carry):
      trainable = carry[0].trainable
      final = trainable[0] if joint else trainable
      update = tree_lib.tree_sub(initial, final)
      return _client_work.ClientOutput(update=update, model_weights=assemble(*carry[0]))

    return _client_work.ClientLoop(init, step, finalize)

  recon_pass = build_reconstruction_pass(
    fm, model, reconstruction_optimizer, client_chunk_size, mesh
  )
  post_pass = _client_work.build_client_work(
    fm,
    post_reconstruction_loop,
    _hparams(client_optimizer, post_spec),
    client_weighting=client_weighting,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
  )

  def initialize():
    hparams = {
      'client_optimizer': post_pass.initialize().hparams,
      'reconstruction_optimizer': recon_pass.initialize().hparams,
    }
    return _client_work.ClientWorkState(hparams, jax.random.PRNGKey(seed))

  def next_fn(state, global_weights, client_batches, client_inputs=(), *, client_part=None):
    locals_, post_batches, post_key, next_key = reconstruct_round(
      model, recon_pass, dataset_split_fn, state, global_weights, client_batches, client_inputs
    )
    post_state = _client_work.ClientWorkState(state.hparams['client_optimizer'], post_key)
    out = post_pass.next(post_state, global_weights, post_batches, locals_, client_part=client_part)
    return _processes.MeasuredProcessOutput(
      state._replace(rng=next_key), out.result, out.measurements
    )

  return _client_work.wrap_client_work(
    post_pass, initialize, next_fn, _client_work.get_hparams, _client_work.set_hparams
  )
