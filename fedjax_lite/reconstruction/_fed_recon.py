"""Federated Reconstruction (Singhal et al., NeurIPS 2021, "Federated Reconstruction: Partially
Local Federated Learning"), TFF's `tff.learning.algorithms.build_fed_recon`."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import optax
from jax.sharding import Mesh

from fedjax_lite import optimizers
from fedjax_lite.algorithms import _common
from fedjax_lite.reconstruction import _client_work, _dataset_split, _model
from fedjax_lite.templates import _client_work as _templates_client_work
from fedjax_lite.templates import _finalizers, _processes


def build_fed_recon(
  model: _model.ReconstructionModel,
  *,
  loss_fn: Callable | None = None,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  server_optimizer: optax.GradientTransformation | None = None,
  client_optimizer: optax.GradientTransformation | None = None,
  reconstruction_optimizer: optax.GradientTransformation | None = None,
  dataset_split_fn: _dataset_split.DatasetSplitFn | None = None,
  client_weighting: _templates_client_work.ClientWeighting | Callable = (
    _templates_client_work.ClientWeighting.NUM_EXAMPLES
  ),
  model_distributor: _processes.DistributionProcess | None = None,
  model_aggregator: Any = None,
  metrics_aggregator: Callable | None = None,
  jointly_train_variables: bool = False,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.LearningProcess:
  """Federated Reconstruction: global weights averaged, local weights rebuilt on every client.

  Each round every sampled client receives the global weights, initializes its local weights
  (a pure function of a key folded from the round and its client id), reconstructs
  them on its reconstruction batches with the global weights frozen, then trains the global
  trainables on its post-reconstruction batches with the locals frozen (both together with
  `jointly_train_variables`, the paper's joint variant). The server averages the global deltas,
  weighted by post-reconstruction examples, and applies them with `server_optimizer`. Local
  weights never leave the client work: the server state holds the global weights only (local
  leaves are `optax.MaskedNode()` in `get_model_weights(state)`). TFF's
  `(<S@SERVER, {D*}@CLIENTS> -> <S@SERVER, M@SERVER>)`; one round is one compiled call.

  Example:
    >>> recon = fl.reconstruction.ReconstructionModel(model, lambda path: 'user' in path)
    >>> process = fl.reconstruction.build_fed_recon(
    ...     recon, loss_fn=fl.models.mean_squared_error,
    ...     client_optimizer=fl.optimizers.build_sgdm(0.5))
    >>> state, metrics = process.next(process.initialize(), client_batches)
    >>> process.set_hparams(state, {'client_work': {'reconstruction_optimizer':
    ...     {'learning_rate': 0.05}}})

  Args:
    model: a `ReconstructionModel` with at least one global trainable leaf.
    loss_fn: `(predictions, labels, sample_weight) -> []`, the masked mean loss used in both
      phases; default the model's own `loss_fn`.
    metrics_fns: `(initialize, update, finalize)` counted after reconstruction only; default the
      model's own. `loss` and `num_examples` are always reported.
    server_optimizer: applied to the averaged delta; default `build_sgdm(1.0)`.
    client_optimizer: post-reconstruction training; default `build_sgdm(0.1)`.
    reconstruction_optimizer: reconstruction of the locals; default `build_sgdm(0.1)`.
    dataset_split_fn: `(client_batches) -> (reconstruction, post_reconstruction)`; default
      `build_dataset_split_fn(split_dataset=True)` (even batches reconstruct, odd train).
    client_weighting: `NUM_EXAMPLES` (post-reconstruction examples, the default), `UNIFORM`,
      or a callable of the client's finalized metrics.
    model_distributor: default `build_broadcast_process`.
    model_aggregator: an aggregation factory; default `MeanFactory()`.
    metrics_aggregator: default `fl.metrics.sum_then_finalize`.
    jointly_train_variables: train locals with the globals after reconstruction.
    client_chunk_size: clients vmapped together (see `build_model_delta_client_work`).
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: each device runs its own clients.
    seed: seeds the per-round keys (local initialization, models that take an `rng`).

  Returns:
    A `LearningProcess`; `get_hparams(state)` is `{'client_work': {'client_optimizer': ...,
    'reconstruction_optimizer': ...}, 'finalizer': server optimizer's}`.
  """
  _client_work.check_reconstruction_model(model)
  server_optimizer = server_optimizer or optimizers.build_sgdm(1.0)
  client_work = _client_work.build_reconstruction_client_work(
    model,
    loss_fn=loss_fn,
    metrics_fns=metrics_fns,
    client_optimizer=client_optimizer or optimizers.build_sgdm(0.1),
    reconstruction_optimizer=reconstruction_optimizer or optimizers.build_sgdm(0.1),
    dataset_split_fn=dataset_split_fn or _dataset_split.build_dataset_split_fn(split_dataset=True),
    client_weighting=client_weighting,
    metrics_aggregator=metrics_aggregator,
    jointly_train_variables=jointly_train_variables,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
  finalizer = _finalizers.build_apply_optimizer_finalizer(
    server_optimizer, model.initial_global_weights
  )
  return _common.compose(
    _client_work.GlobalModel(model.initial_global_weights, model.input_spec),
    client_work,
    finalizer,
    model_distributor,
    model_aggregator,
  )
