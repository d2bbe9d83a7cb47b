"""Evaluation of a reconstruction model: reconstruct the locals on one split, evaluate on the
other (TFF's `tff.learning.algorithms.build_fed_recon_eval`)."""

from __future__ import annotations

from collections.abc import Callable

import optax
from jax.sharding import Mesh

from fedjax_lite import aggregators, optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.reconstruction import _client_work, _dataset_split, _model
from fedjax_lite.templates import _client_work as _templates_client_work
from fedjax_lite.templates import _finalizers, _processes


def build_fed_recon_eval(
  model: _model.ReconstructionModel,
  *,
  loss_fn: Callable | None = None,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  reconstruction_optimizer: optax.GradientTransformation | None = None,
  dataset_split_fn: _dataset_split.DatasetSplitFn | None = None,
  model_distributor: _processes.DistributionProcess | None = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """Evaluates global weights after each client reconstructs its locals.

  Per client: split its batches with `dataset_split_fn`; initialize and reconstruct the local
  weights on the first part exactly as `build_fed_recon` does (global weights frozen); then
  evaluate (`training=False`) the global weights with the reconstructed locals on the second
  part. Metric states are summed over clients, then finalized (`fl.metrics.sum_then_finalize`
  by default). Nothing is trained on the server; set the weights to evaluate with
  `set_model_weights` (e.g. `fed_recon.get_model_weights(train_state)`).

  Metrics: `metrics['client_work']['eval']['current_round_metrics' | 'total_rounds_metrics']`,
  each `{'loss', 'num_examples', ...model metrics}`, as `build_fed_eval`.

  Example:
    >>> evaluation = fl.reconstruction.build_fed_recon_eval(recon, loss_fn=loss)
    >>> state = evaluation.set_model_weights(evaluation.initialize(), weights)
    >>> _, metrics = evaluation.next(state, held_out_batches)

  Args:
    model: a `ReconstructionModel`.
    loss_fn: `(predictions, labels, sample_weight) -> []` for reconstruction and the reported
      loss; default the model's own.
    metrics_fns: `(initialize, update, finalize)`; default the model's own.
    reconstruction_optimizer: default `build_sgdm(0.1)`; hparams under
      `get_hparams(state)['client_work']['reconstruction_optimizer']`.
    dataset_split_fn: default `build_dataset_split_fn(split_dataset=True)`.
    model_distributor: default `build_broadcast_process`.
    metrics_aggregator: `(finalize) -> (client states) -> metrics`; default sum then finalize.
    client_chunk_size: clients vmapped together (see `fl.templates.build_client_work`).
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: each device runs its own clients.
    seed: seeds the per-round keys.
  """
  fm = _client_work.training_model(model, loss_fn, metrics_fns)
  reconstruction_optimizer = reconstruction_optimizer or optimizers.build_sgdm(0.1)
  _templates_client_work.check_optimizer(reconstruction_optimizer, 'reconstruction_optimizer')
  dataset_split_fn = dataset_split_fn or _dataset_split.build_dataset_split_fn(split_dataset=True)
  if not callable(dataset_split_fn):
    raise TypeError(f'dataset_split_fn must be callable; got {type(dataset_split_fn).__name__}')

  def evaluation_loop(global_weights, hparams):
    del hparams

    def step(local, batch, mask, key):
      del key
      weights = _model.merge(global_weights, local)
      _, step_metrics = _templates_client_work.masked_forward(fm, weights, batch, mask, False)
      return local, step_metrics

    def finalize(local):
      return _templates_client_work.ClientOutput(model_weights=_model.merge(global_weights, local))

    return _templates_client_work.ClientLoop(lambda local, key: local, step, finalize)

  recon_pass = _client_work.build_reconstruction_pass(
    fm, model, reconstruction_optimizer, client_chunk_size, mesh
  )
  # The state's hparams are the reconstruction optimizer's (the evaluation loop reads none).
  eval_pass = _templates_client_work.build_client_work(
    fm,
    evaluation_loop,
    {'reconstruction_optimizer': recon_pass.initialize().hparams},
    metrics_aggregator=metrics_aggregator,
    evaluation=True,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )

  def next_fn(state, global_weights, client_batches, client_inputs=(), *, client_part=None):
    locals_, eval_batches, eval_key, next_key = _client_work.reconstruct_round(
      model, recon_pass, dataset_split_fn, state, global_weights, client_batches, client_inputs
    )
    out = eval_pass.next(
      state._replace(rng=eval_key), global_weights, eval_batches, locals_, client_part=client_part
    )
    new_state = out.state._replace(rng=next_key)
    return _processes.MeasuredProcessOutput(new_state, out.result, out.measurements)

  client_work = _templates_client_work.wrap_client_work(
    eval_pass,
    eval_pass.initialize,
    next_fn,
    _templates_client_work.get_hparams,
    _templates_client_work.set_hparams,
  )
  return _common.compose(
    _client_work.GlobalModel(model.initial_global_weights, model.input_spec),
    client_work,
    _finalizers.build_identity_finalizer(),
    model_distributor,
    aggregators.SumFactory(),
    update_spec=(),
  )
