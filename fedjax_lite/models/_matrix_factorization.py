"""Matrix factorization for rating prediction, centralized or one user's model (for FedRecon)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.metrics import _functional
from fedjax_lite.models import _losses, _model


def rating_metrics(threshold: float = 0.5):
  """`{'rmse', 'rating_accuracy'}` metric functions for rating predictions `[batch_size]`.

  `rating_accuracy` is the fraction of real examples with `|prediction − rating| <= threshold`
  (Singhal et al. 2021 and TFF's reconstruction tutorial; 0.5 counts a prediction that rounds
  to the rating). `rmse` is the square root of the summed-then-averaged squared error.
  """
  mse = metrics_lib.mean_squared_error()
  rmse = metrics_lib.FunctionalMetric(
    mse.initialize, mse.update, lambda state: jnp.sqrt(mse.finalize(state))
  )
  accuracy = _functional._per_example_mean(
    lambda predictions, labels: (
      jnp.abs(predictions - jnp.reshape(labels, predictions.shape)) <= threshold
    )
  )
  return metrics_lib.create_functional_metric_fns({'rmse': rmse, 'rating_accuracy': accuracy})


def matrix_factorization(
  num_users: int,
  num_items: int,
  dim: int,
  *,
  personal: bool = False,
  use_biases: bool = True,
  init_scale: float = 0.05,
  seed: int = 0,
) -> _model.FunctionalModel:
  """Matrix factorization `r̂(u, i) = <p_u, q_i> + b_u + b_i + μ` as a `FunctionalModel`.

  Trained with mean squared error; metrics `rmse` and `rating_accuracy` (`rating_metrics`).
  Embeddings start uniform in `[-init_scale, init_scale]` (Keras' default), biases at 0.

  Centralized (`personal=False`): trainable `{'user_embedding': [num_users, dim],
  'item_embedding': [num_items, dim], 'user_bias': [num_users], 'item_bias': [num_items],
  'global_bias': []}`; a batch is `{'x': {'user_id': [B] int32, 'item_id': [B] int32},
  'y': [B] float32 ratings}`.

  One user's model (`personal=True`, `num_users` must be 1, as in TFF's research code): the
  user leaves hold that user alone, `'user_embedding': [dim]` and `'user_bias': []`, and a
  batch is `{'x': [B] int32 item ids, 'y': [B] float32}` — each client of a federated run is one
  user. For Federated Reconstruction the user leaves are local, everything else global:

    >>> model = fl.models.matrix_factorization(1, num_items, 50, personal=True)
    >>> recon = fl.reconstruction.ReconstructionModel(model, lambda path: 'user' in path)

  Args:
    num_users: rows of the user matrix (1 with `personal`).
    num_items: rows of the item matrix.
    dim: latent factors per user and item.
    personal: build one user's model (see above).
    use_biases: add user, item and global biases.
    init_scale: half-width of the uniform embedding initializer.
    seed: seeds the initializer.
  """
  for name, value in [('num_users', num_users), ('num_items', num_items), ('dim', dim)]:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise ValueError(f'{name} must be an int >= 1; got {value!r}')
  if personal and num_users != 1:
    raise ValueError(
      f'num_users must be 1 with personal=True (the model holds one user); got {num_users}'
    )
  if not init_scale >= 0:
    raise ValueError(f'init_scale must be >= 0; got {init_scale!r}')
  user_key, item_key = jax.random.split(jax.random.PRNGKey(seed))
  user_shape = (dim,) if personal else (num_users, dim)

  def uniform(key, shape):
    return jax.random.uniform(key, shape, jnp.float32, -init_scale, init_scale)

  trainable = {
    'user_embedding': uniform(user_key, user_shape),
    'item_embedding': uniform(item_key, (num_items, dim)),
  }
  if use_biases:
    trainable['user_bias'] = jnp.zeros(user_shape[:-1], jnp.float32)
    trainable['item_bias'] = jnp.zeros((num_items,), jnp.float32)
    trainable['global_bias'] = jnp.zeros((), jnp.float32)

  def predict_on_batch(weights, x, training=True):
    del training
    w = weights.trainable
    if personal:
      items = x
      user_vec, user_bias = w['user_embedding'][None, :], w.get('user_bias')
    else:
      items, users = x['item_id'], x['user_id']
      user_vec = w['user_embedding'][users]
      user_bias = w['user_bias'][users] if use_biases else None
    prediction = jnp.sum(user_vec * w['item_embedding'][items], axis=-1)
    if use_biases:
      prediction = prediction + user_bias + w['item_bias'][items] + w['global_bias']
    return prediction

  ids = jax.ShapeDtypeStruct((None,), jnp.int32)
  x_spec = ids if personal else {'user_id': ids, 'item_id': ids}
  return _model.FunctionalModel(
    initial_weights=_model.ModelWeights(trainable, ()),
    predict_on_batch_fn=predict_on_batch,
    loss_fn=_losses.mean_squared_error,
    metrics_fns=rating_metrics(),
    input_spec={'x': x_spec, 'y': jax.ShapeDtypeStruct((None,), jnp.float32)},
  )
