"""Federated mini-batch k-means (Sculley, 2010, "Web-Scale K-Means Clustering"), TFF's
`tff.learning.algorithms.build_fed_kmeans`: a learning process without gradients, built from the
same templates as FedAvg."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from fedjax_lite import aggregators, models
from fedjax_lite.algorithms import _common
from fedjax_lite.templates import _client_work, _processes


def kmeans_model(centroids: jax.Array) -> models.FunctionalModel:
  """Centroids `[k, *data_shape]` as a model: predictions are the squared distances `[batch, k]`
  of each point to each centroid, the loss the mean distance to the nearest centroid."""

  def predict(weights, x, training=True):
    del training
    diff = x[:, None] - weights.trainable[None]
    return jnp.sum(diff * diff, axis=tuple(range(2, diff.ndim)))

  def loss(distances, labels, sample_weight=None):
    del labels
    return models.weighted_mean(jnp.min(distances, axis=1), sample_weight)

  return models.FunctionalModel(
    initial_weights=models.ModelWeights(centroids, ()),
    predict_on_batch_fn=predict,
    loss_fn=loss,
    input_spec={
      'x': jax.ShapeDtypeStruct((None, *centroids.shape[1:]), jnp.float32),
      'y': jax.ShapeDtypeStruct((None,), jnp.int32),
    },
  )


def _kmeans_client_loop(model: models.FunctionalModel):
  """Each client assigns its points to the nearest broadcast centroid and sends per-cluster
  `(sums [k, *data_shape] float32, counts [k] float32)` (float counts as TFF's, so that an
  aggregator which only takes floats, e.g. a DP sum, can sum them)."""

  def client_loop(model_weights, hparams):
    del hparams
    centroids = model_weights.trainable
    num_clusters = centroids.shape[0]

    def init(client_input, key):
      del client_input, key
      return jnp.zeros_like(centroids), jnp.zeros((num_clusters,), jnp.float32)

    def step(carry, batch, mask, key):
      del key
      _, step_metrics = _client_work.masked_forward(model, model_weights, batch, mask, False)
      points = _client_work.masked_batch(batch, mask)['x']
      nearest = jnp.argmin(step_metrics[0].predictions, axis=1)  # first index on ties
      one_hot = jax.nn.one_hot(nearest, num_clusters, dtype=jnp.float32) * (mask > 0)[:, None]
      sums = jnp.tensordot(one_hot.T.astype(points.dtype), points, axes=1)
      return (carry[0] + sums, carry[1] + jnp.sum(one_hot, axis=0)), step_metrics

    return _client_work.ClientLoop(init, step, lambda carry: _client_work.ClientOutput(carry))

  return client_loop


def _kmeans_finalizer(num_clusters: int) -> _processes.FinalizerProcess:
  """State: the points assigned to each cluster so far, `[k] float32`, starting at 1 (TFF's
  pseudo-count). New centroid = (count · centroid + sum of new points) / (count + new count)."""

  def next_fn(counts, model_weights, update):
    new_sums, new_counts = update
    total = counts + new_counts

    def divide_no_nan(x):
      return jnp.where(total != 0, x / jnp.where(total != 0, total, 1.0), 0.0)

    shape = (num_clusters,) + (1,) * (new_sums.ndim - 1)
    current_scale = divide_no_nan(counts).reshape(shape)
    new_scale = divide_no_nan((new_counts > 0).astype(jnp.float32)).reshape(shape)
    centroids = current_scale * model_weights.trainable + new_scale * new_sums
    return _processes.MeasuredProcessOutput(total, model_weights._replace(trainable=centroids), {})

  return _processes.FinalizerProcess(lambda: jnp.ones((num_clusters,), jnp.float32), next_fn)


def _tff_measurements(client_work: _processes.ClientWorkProcess) -> _processes.ClientWorkProcess:
  """`client_work` reporting as TFF's k-means does, `{'num_examples': [] float32}`, with this
  library's `loss` and `non_finite_clients` beside it (not nested under `'train'`), and with no
  check of the labels, which k-means ignores."""

  def next_fn(state, model_weights, client_batches, client_inputs=(), *, client_part=None):
    out = client_work.next(
      state, model_weights, client_batches, client_inputs, client_part=client_part
    )
    train = out.measurements['train']
    measurements = {
      **train,
      'num_examples': train['num_examples'].astype(jnp.float32),
      'non_finite_clients': out.measurements['non_finite_clients'],
    }
    return out._replace(measurements=measurements)

  # The labels are never read, so none is checked: without a check of its own, `compose` would
  # take the predictions `[batch, k]` for a k-class classifier's and refuse labels >= k.
  return client_work._replace(next=next_fn, check_client_data=_labels_unused)


def _labels_unused(client_batches: Any) -> None:
  del client_batches


def _check_args(
  num_clusters: Any, data_shape: Any, random_seed: Any, sum_aggregator: Any
) -> tuple[int, ...]:
  if isinstance(num_clusters, bool) or not isinstance(num_clusters, int) or num_clusters < 1:
    raise ValueError(f'num_clusters must be an int >= 1; got {num_clusters!r}')
  if not isinstance(data_shape, tuple | list) or not all(
    isinstance(d, int | np.integer) and not isinstance(d, bool) and d >= 1 for d in data_shape
  ):
    raise ValueError(
      f'data_shape must be a tuple of ints >= 1, the shape of one point; got {data_shape!r}'
    )
  if isinstance(random_seed, bool) or not isinstance(random_seed, int):
    raise TypeError(f'random_seed must be an int; got {random_seed!r}')
  if sum_aggregator is not None and not hasattr(sum_aggregator, 'create'):
    raise TypeError(
      'sum_aggregator must be an aggregation factory with create(value_spec) (e.g. '
      f'fl.aggregators.SumFactory()); got {type(sum_aggregator).__name__}'
    )
  return tuple(int(d) for d in data_shape)


def build_fed_kmeans(
  num_clusters: int,
  data_shape: tuple[int, ...],
  random_seed: int = 0,
  distributor: _processes.DistributionProcess | None = None,
  sum_aggregator: Any = None,
  *,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
) -> _processes.LearningProcess:
  """Federated mini-batch k-means, TFF's `tff.learning.algorithms.build_fed_kmeans` (after
  Sculley, 2010, "Web-Scale K-Means Clustering").

  Each round, every client assigns each of its points to the nearest centroid (squared
  Euclidean distance, the lowest index on ties) and sends, per cluster, the sum of its points
  and their count. The sums are added over clients (`sum_aggregator`); the server keeps each
  cluster's running count `n` (starting at 1) and moves centroid `c` with `m` new points of
  sum `s` to `(n·c + s) / (n + m)`, the count to `n + m`. The round's "mini-batch" is the union
  of its clients' points. Centroids start as standard normal draws from `random_seed`.

  Batches are `{'x': points [batch_size, *data_shape] float32, 'y': [batch_size] int32}`, as
  `fl.data` builds them; the labels are ignored (give zeros for unlabelled data). As in TFF, the
  counts (sent and held by the server) are float32, and `metrics['client_work']` holds
  `num_examples` ([] float32, TFF's only metric); beside it are `loss`, the mean squared distance
  of the round's points to their nearest centroid before the update, and `non_finite_clients`
  (a client whose points are not finite is left out). Departures from TFF:
  `get_model_weights` returns `ModelWeights(trainable=centroids [k, *data_shape],
  non_trainable=())` (TFF: the bare centroids), like every other process here, so the
  simulation driver, checkpoints and evaluation treat it as any model; `random_seed` is one int,
  default 0 (TFF: two ints, default the clock), and draws from `jax.random`.

  Example:
    >>> process = fl.algorithms.build_fed_kmeans(num_clusters=10, data_shape=(64,))
    >>> state = process.initialize()
    >>> state, metrics = process.next(state, client_batches)
    >>> centroids = process.get_model_weights(state).trainable  # [10, 64]
    >>> state.finalizer  # [10] float32, points per cluster so far (+1)

  Args:
    num_clusters: k, an int >= 1.
    data_shape: the shape of one point, a tuple of ints.
    random_seed: seeds the initial centroids.
    distributor: default `fl.templates.build_broadcast_process`.
    sum_aggregator: an unweighted factory summing `(sums, counts)`; default
      `fl.aggregators.SumFactory()`.
    client_chunk_size: clients vmapped together (see `fl.templates.build_client_work`).
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: each device runs its own clients.

  Returns:
    A `LearningProcess`; `state.finalizer` holds the running counts `[k] float32`.
  """
  data_shape = _check_args(num_clusters, data_shape, random_seed, sum_aggregator)
  key = jax.random.PRNGKey(random_seed)
  model = kmeans_model(jax.random.normal(key, (num_clusters, *data_shape), jnp.float32))
  client_work = _client_work.build_client_work(
    model, _kmeans_client_loop(model), client_chunk_size=client_chunk_size, mesh=mesh
  )
  update_spec = (
    jax.ShapeDtypeStruct((num_clusters, *data_shape), jnp.float32),
    jax.ShapeDtypeStruct((num_clusters,), jnp.float32),
  )
  return _common.compose(
    model,
    _tff_measurements(client_work),
    _kmeans_finalizer(num_clusters),
    distributor,
    sum_aggregator or aggregators.SumFactory(),
    update_spec=update_spec,
  )
