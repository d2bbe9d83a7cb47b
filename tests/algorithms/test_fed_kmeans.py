"""Federated k-means against a numpy loop over clients with TFF's server update."""

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
    train = metrics['client_work']['train']
    assert int(train['num_examples']) == expected['num_examples'] == sum(SIZES)
    np.testing.assert_allclose(float(train['loss']), expected['loss'], rtol=1e-5)
  assert counts[3] == 1 and np.all(counts[:3] > 1)
  np.testing.assert_array_equal(got[3], start[3])


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
  np.testing.assert_array_equal(counts, np.ones(K, np.int32))


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
