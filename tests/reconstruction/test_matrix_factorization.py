"""fl.models.matrix_factorization against numpy, and its rating metrics."""

import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl


def test_centralized_and_personal_predictions_equal_numpy():
  model = fl.models.matrix_factorization(4, 6, 3, init_scale=0.5, seed=1)
  w = {k: np.asarray(v, np.float64) for k, v in model.initial_weights.trainable.items()}
  w['user_bias'] = w['user_bias'] + np.arange(4)
  w['item_bias'] = w['item_bias'] + 0.1 * np.arange(6)
  w['global_bias'] = 3.0
  users, items = np.array([0, 3, 3, 1], np.int32), np.array([5, 0, 2, 2], np.int32)
  weights = fl.ModelWeights({k: jnp.asarray(v, jnp.float32) for k, v in w.items()}, ())
  got = model.predict_on_batch(weights, {'user_id': users, 'item_id': items})
  want = [
    w['user_embedding'][u] @ w['item_embedding'][i] + w['user_bias'][u] + w['item_bias'][i] + 3.0
    for u, i in zip(users, items, strict=True)
  ]
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # One user's model: the same user row, item ids only.
  personal = fl.models.matrix_factorization(1, 6, 3, personal=True)
  assert personal.initial_weights.trainable['user_embedding'].shape == (3,)
  assert personal.initial_weights.trainable['user_bias'].shape == ()
  user = {
    'user_embedding': weights.trainable['user_embedding'][3],
    'user_bias': weights.trainable['user_bias'][3],
  }
  one = fl.ModelWeights({**weights.trainable, **user}, ())
  np.testing.assert_allclose(personal.predict_on_batch(one, items[1:3]), want[1:3], rtol=1e-5)


def test_rating_metrics():
  init, update, finalize = fl.models.rating_metrics()
  out = fl.BatchOutput(predictions=jnp.array([3.4, 2.0, 5.0, 1.0]))
  state = update(init(), jnp.array([3.0, 2.6, 4.5, 9.0]), out, jnp.array([1.0, 1.0, 1.0, 0.0]))
  metrics = finalize(state)
  np.testing.assert_allclose(metrics['rating_accuracy'], 2 / 3)  # 0.4 and 0.5 count, 0.6 not
  np.testing.assert_allclose(metrics['rmse'], np.sqrt((0.16 + 0.36 + 0.25) / 3), rtol=1e-6)


def test_errors():
  with pytest.raises(ValueError, match='num_users must be 1 with personal=True'):
    fl.models.matrix_factorization(5, 6, 3, personal=True)
  with pytest.raises(ValueError, match='dim must be an int >= 1'):
    fl.models.matrix_factorization(5, 6, 0)
