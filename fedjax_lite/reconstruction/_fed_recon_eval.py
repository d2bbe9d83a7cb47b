"""Evaluation of a reconstruction model: reconstruct the locals on one split, evaluate on the
other (TFF's `tff.learning.algorithms.build_fed_recon_eval`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from fedjax_lite import aggregators, optimizers
from fedjax_lite import metrics as metrics_lib
from fedjax_lite import tree as tree_lib
from fedjax_lite.algorithms import _common, _fed_eval
from fedjax_lite.data import _client_batches
from fedjax_lite.reconstruction import _client_work, _dataset_split, _model
from fedjax_lite.templates import _client_work as _templates_client_work
from fedjax_lite.templates import _cohort, _processes


class FedReconEvalState(NamedTuple):
  """Client-work state of `build_fed_recon_eval`.

  Attributes:
    hparams: `{'reconstruction_optimizer': {...}}`.
    rng: `[2] uint32` key of this round's randomness (local initialization, dropout).
    total_rounds_metrics: the metric state summed over all rounds so far.
  """

  hparams: dict
  rng: jax.Array
  total_rounds_metrics: Any


def build_fed_recon_eval(
  model: _model.ReconstructionModel,
  *,
  loss_fn: Callable | None = None,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  reconstruction_optimizer: optax.GradientTransformation | None = None,
  dataset_split_fn: _dataset_split.DatasetSplitFn | None = None,
  model_distributor: _processes.DistributionProcess | None = None,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | None = None,
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
    client_chunk_size: clients vmapped together.
    seed: seeds the per-round keys.
  """
  fm = _client_work.training_model(model, loss_fn, metrics_fns)
  reconstruction_optimizer = reconstruction_optimizer or optimizers.build_sgdm(0.1)
  _templates_client_work.check_optimizer(reconstruction_optimizer, 'reconstruction_optimizer')
  dataset_split_fn = dataset_split_fn or _dataset_split.build_dataset_split_fn(split_dataset=True)
  if not callable(dataset_split_fn):
    raise TypeError(f'dataset_split_fn must be callable; got {type(dataset_split_fn).__name__}')
  _cohort.check_chunk_size(client_chunk_size)
  metric_init, metric_update, metric_finalize = _templates_client_work.training_metric_fns(fm)
  aggregate_metrics = (metrics_aggregator or metrics_lib.sum_then_finalize)(metric_finalize)
  local_spec = model.local_trainable_variables

  def initialize():
    hparams = {
      'reconstruction_optimizer': optimizers.get_hparams(reconstruction_optimizer.init(local_spec))
    }
    return tree_lib.tree_strong_types(
      FedReconEvalState(hparams, jax.random.PRNGKey(seed), metric_init())
    )

  def next_fn(state, global_weights, client_batches):
    _client_batches.check_client_batches(client_batches, model.input_spec)
    round_key, next_key = jax.random.split(state.rng)
    locals_, eval_batches = _client_work.split_and_reconstruct(
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

    def init_client(index):
      return jax.tree.map(lambda x: x[index], locals_), metric_init()

    def step(carry, batch, mask, step_index):
      del step_index
      local, metric_state = carry
      weights = _model.merge(global_weights, local)
      _, (output, y) = _templates_client_work.masked_forward(fm, weights, batch, mask, False)
      return local, metric_update(metric_state, y, output, mask)

    client_states = _cohort.run_clients(
      init_client, step, lambda carry: carry[1], eval_batches, client_chunk_size
    )
    total = tree_lib.tree_add(
      state.total_rounds_metrics, tree_lib.tree_sum_over_clients(client_states)
    )
    measurements = {
      'eval': {
        'current_round_metrics': aggregate_metrics(client_states),
        'total_rounds_metrics': metric_finalize(total),
      }
    }
    num_clients = client_batches.mask.shape[0]
    result = _processes.ClientResult((), jnp.zeros((num_clients,)))
    new_state = FedReconEvalState(state.hparams, next_key, total)
    return _processes.MeasuredProcessOutput(new_state, result, measurements)

  client_work = _processes.ClientWorkProcess(
    initialize, next_fn, _client_work.get_hparams, _client_work.set_hparams
  )
  return _common.compose(
    _client_work.GlobalModel(model.initial_global_weights, model.input_spec),
    client_work,
    _fed_eval._identity_finalizer(),
    model_distributor,
    aggregators.SumFactory(),
    update_spec=(),
  )
