"""`build_apply_optimizer_finalizer`: the server optimizer applied to the aggregated update."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.templates import _client_work, _processes


def build_apply_optimizer_finalizer(
  server_optimizer: optax.GradientTransformation, model_weights_spec: Any
) -> _processes.FinalizerProcess:
  """A `FinalizerProcess` that treats the aggregated model delta as a gradient.

  `new_trainable = optimizer(weights.trainable, gradient=update)`; with SGD at learning rate 1
  this is the (weighted) average of the clients' models. An update holding a non-finite value is
  rejected: weights and optimizer state stay as they were, and `update_non_finite` is 1.

  Args:
    server_optimizer: an optax transformation; its hyperparameters are in this process's state.
    model_weights_spec: `ModelWeights` of arrays or `jax.ShapeDtypeStruct`s.

  Returns:
    `FinalizerProcess`; `next(state, model_weights, update) -> MeasuredProcessOutput(state,
    new model_weights, {'update_non_finite': [] int32})`.
  """
  _client_work.check_optimizer(server_optimizer, 'server_optimizer')
  if not isinstance(model_weights_spec, models.ModelWeights):
    raise TypeError(
      f'model_weights_spec must be a ModelWeights; got {type(model_weights_spec).__name__}'
    )
  trainable_zeros = jax.tree.map(
    lambda s: jnp.zeros(s.shape, s.dtype), model_weights_spec.trainable
  )

  def initialize():
    return tree_lib.tree_strong_types(server_optimizer.init(trainable_zeros))

  def next_fn(state, model_weights, update):
    finite = tree_lib.tree_all_finite(update)
    updates, new_state = server_optimizer.update(update, state, model_weights.trainable)
    trainable = optax.apply_updates(model_weights.trainable, updates)
    new_weights = model_weights._replace(
      trainable=tree_lib.tree_where(finite, trainable, model_weights.trainable)
    )
    return _processes.MeasuredProcessOutput(
      tree_lib.tree_where(finite, new_state, state),
      new_weights,
      {'update_non_finite': (~finite).astype(jnp.int32)},
    )

  return _processes.FinalizerProcess(
    initialize,
    next_fn,
    optimizers.get_hparams,
    optimizers.set_hparams,
    weights_spec=tree_lib.tree_specs(model_weights_spec),
  )


def build_identity_finalizer() -> _processes.FinalizerProcess:
  """A `FinalizerProcess` that keeps the model weights as they are (evaluation processes)."""

  def next_fn(state, model_weights, update):
    del update
    return _processes.MeasuredProcessOutput(state, model_weights, {})

  return _processes.FinalizerProcess(lambda: (), next_fn)
