"""Federated k-means against a numpy loop over clients with TFF's server update
(tensorflow_federated/python/learning/algorithms/kmeans_clustering.py)."""

import chex
import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [5, 0, 12, 3, 8]
DATA_SHAPE = (2, 3)
K = 4


def _batches(round_num):
  rng = np.random.default_rng(round_num)
  clients = [
    {
      # Two blobs, so clusters are uneven and one far centroid gets no point.
      'x': (rng.standard_normal((n, *DATA_SHAPE)) + 3 * (i % 2)).astype(np.float32),
      'y': np.zeros(n, np.int32),
    }
    for i, n in enumerate(SIZES)
  ]
  return fl.data.build_client_batches(clients, batch_size=4, seed=round_num)


def _numpy_round(centroids, counts, batches):
  """TFF's round: nearest centroid (first on ties), per-cluster sums and counts over clients,
  then `c <- (n·c + s) / (n + m)`, `n <- n + m`. Returns the metrics too."""
  sums, new_counts = np.zeros_like(centroids), np.zeros_like(counts)
  distances = []
  for c in range(len(SIZES)):
    for x, _ in ref.real_batches(batches, c):
      for point in x.astype(np.float64):
        d = ((centroids - point) ** 2).sum(axis=(1, 2))
        nearest = int(np.argmin(d))
        sums[nearest] += point
        new_counts[nearest] += 1
        distances.append(d[nearest])
  total = counts + new_counts
  scale = (counts / total)[:, None, None]
  new_scale = ((new_counts > 0) / total)[:, None, None]
  metrics = {'num_examples': len(distances), 'loss': np.mean(distances)}
  return scale * centroids + new_scale * sums, total, metrics


@pytest.mark.parametrize('chunk', [None, 2])
def test_fed_kmeans_equals_numpy_loop_over_three_rounds(chunk):
  process = fl.algorithms.build_fed_kmeans(K, DATA_SHAPE, random_seed=3, client_chunk_size=chunk)
  assert isinstance(process, fl.LearningProcess)
  start = np.zeros((K, *DATA_SHAPE), np.float32)
  start[1] = 3.0
  start[2] = -1.0
  start[3] = 50.0  # never nearest: its count and centroid must stay as they are
  state = process.initialize()
  state = process.set_model_weights(state, fl.ModelWeights(start, ()))
  centroids, counts = start.astype(np.float64), np.ones(K, np.int64)
  for round_num in range(3):
    batches = _batches(round_num)
    state, metrics = process.next(state, batches)
    centroids, counts, expected = _numpy_round(centroids, counts, batches)
    got = process.get_model_weights(state).trainable
    np.testing.assert_allclose(got, centroids, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(state.finalizer, counts)
    measured = metrics['client_work']
    assert float(measured['num_examples']) == expected['num_examples'] == sum(SIZES)
    np.testing.assert_allclose(float(measured['loss']), expected['loss'], rtol=1e-5)
    assert int(measured['non_finite_clients']) == 0
  assert counts[3] == 1 and np.all(counts[:3] > 1)
  np.testing.assert_array_equal(got[3], start[3])


def test_state_and_measurements_are_tffs():
  """TFF's state: float32 cluster weights starting at 1 in `state.finalizer` (TFF moved them
  from int32 to float32 so that DP aggregators can sum them); its client work reports
  `{'num_examples'}` as float32 directly under `client_work`. The state keeps its spec."""
  process = fl.algorithms.build_fed_kmeans(K, DATA_SHAPE)
  state = process.initialize()
  assert state.finalizer.dtype == np.float32
  np.testing.assert_array_equal(state.finalizer, np.ones(K, np.float32))
  new_state, metrics = process.next(state, _batches(0))
  chex.assert_trees_all_equal_shapes_and_dtypes(new_state, state)
  assert set(metrics['client_work']) == {'num_examples', 'loss', 'non_finite_clients'}
  assert metrics['client_work']['num_examples'].dtype == np.float32
  assert metrics['client_work']['num_examples'].shape == ()
  assert float(jax.numpy.sum(new_state.finalizer)) == K + sum(SIZES)


def test_counts_sum_through_a_float_only_aggregator():
  """Float counts, as TFF's, can go through an aggregator that takes only floating-point values
  (TFF's reason for them, e.g. DP sums): a simulated secure sum, fine enough to be exact to
  1e-3 here, gives the plain sum's round."""
  batches = _batches(0)
  plain = fl.algorithms.build_fed_kmeans(K, DATA_SHAPE, random_seed=1)
  secure = fl.algorithms.build_fed_kmeans(
    K, DATA_SHAPE, random_seed=1, sum_aggregator=fl.aggregators.SecureSumFactory(200.0, bits=24)
  )
  a, _ = plain.next(plain.initialize(), batches)
  b, _ = secure.next(secure.initialize(), batches)
  chex.assert_trees_all_close(b.global_model_weights, a.global_model_weights, atol=1e-3)
  chex.assert_trees_all_close(b.finalizer, a.finalizer, atol=1e-3)


def test_labels_are_ignored_whatever_their_values():
  """k-means reads only the points: labels beyond the number of clusters (e.g. a labelled
  dataset's classes) change nothing and raise nothing, though the predictions `[batch, k]` look
  like a k-class classifier's."""
  process = fl.algorithms.build_fed_kmeans(K, DATA_SHAPE, random_seed=2)
  batches = _batches(0)
  labelled = batches._replace(
    batch={**batches.batch, 'y': (np.arange(batches.mask.size) % 10).reshape(batches.mask.shape)}
  )
  labelled = labelled._replace(batch={**labelled.batch, 'y': labelled.batch['y'].astype(np.int32)})
  a, _ = process.next(process.initialize(), batches)
  b, _ = process.next(process.initialize(), labelled)
  chex.assert_trees_all_equal(a, b)


def test_initial_centroids_are_seeded_normal_draws():
  def initial(seed):
    process = fl.algorithms.build_fed_kmeans(K, DATA_SHAPE, random_seed=seed)
    state = process.initialize()
    return process.get_model_weights(state).trainable, state.finalizer

  a, counts = initial(7)
  b, _ = initial(7)
  c, _ = initial(8)
  assert a.shape == (K, *DATA_SHAPE) and a.dtype == np.float32
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c)
  np.testing.assert_array_equal(a, jax.random.normal(jax.random.PRNGKey(7), a.shape))
  np.testing.assert_array_equal(counts, np.ones(K, np.float32))


@pytest.mark.parametrize(
  ('kwargs', 'error', 'match'),
  [
    (dict(num_clusters=0), ValueError, 'num_clusters must be an int >= 1'),
    (dict(num_clusters=2.0), ValueError, 'num_clusters must be an int >= 1'),
    (dict(data_shape=(3, 0)), ValueError, 'data_shape must be a tuple of ints'),
    (dict(data_shape=3), ValueError, 'data_shape must be a tuple of ints'),
    (dict(random_seed=(1, 2)), TypeError, 'random_seed must be an int'),
    (dict(sum_aggregator='sum'), TypeError, 'sum_aggregator must be an aggregation factory'),
  ],
)
def test_bad_arguments_are_named(kwargs, error, match):
  args = {'num_clusters': K, 'data_shape': DATA_SHAPE, **kwargs}
  with pytest.raises(error, match=match):
    fl.algorithms.build_fed_kmeans(**args)


def test_points_of_another_shape_are_named():
  process = fl.algorithms.build_fed_kmeans(K, (5,))
  with pytest.raises(ValueError, match=r"client_batches leaf \['x'\] has shape"):
    process.next(process.initialize(), _batches(0))
