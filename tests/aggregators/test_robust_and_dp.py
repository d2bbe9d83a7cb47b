"""Clipping, zeroing, adaptive norms, DP-FedAvg's Gaussian mean and the stacked robust
reductions against numpy, alone and streamed through FedAvg rounds (chunks, 8 devices)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from jax.sharding import Mesh

import fedjax_lite as fl

AGG = fl.aggregators
RNG = np.random.default_rng(0)
# Five clients' values with global L2 norms of about 0.3 to 6.
VALUES = {
  'a': (RNG.standard_normal((5, 3, 2)) * np.array([0.1, 0.5, 1.0, 2.0, 3.5])[:, None, None]),
  'b': RNG.standard_normal((5, 4)) * np.array([0.1, 0.5, 1.0, 2.0, 3.5])[:, None],
}
VALUES = {k: v.astype(np.float32) for k, v in VALUES.items()}
WEIGHTS = np.array([1.0, 3.0, 2.0, 5.0, 4.0], np.float32)
SPEC = fl.tree.tree_specs(jax.tree.map(lambda x: x[0], VALUES))


def _client(c):
  return {k: v[c].astype(np.float64) for k, v in VALUES.items()}


def _norm(value, order=2.0):
  flat = np.concatenate([np.ravel(x) for x in value.values()])
  if order == 1.0:
    return np.abs(flat).sum()
  if order == 2.0:
    return np.sqrt((flat**2).sum())
  return np.abs(flat).max()


def _weighted_mean(values, weights):
  total = sum(weights)
  return {k: sum(w * v[k] for v, w in zip(values, weights, strict=True)) / total for k in VALUES}


def _assert_tree_close(got, want, **tol):
  for k in want:
    np.testing.assert_allclose(got[k], want[k], **(tol or {'rtol': 1e-5, 'atol': 1e-6}))


def test_clipping_bounds_every_norm_and_leaves_small_values_unchanged():
  process = AGG.clipping_factory(1.0, AGG.MeanFactory()).create(SPEC)
  assert process.is_weighted and process.streams
  out = process.next(process.initialize(), VALUES, WEIGHTS)
  clipped = []
  for c in range(5):
    v = _client(c)
    n = _norm(v)
    clipped.append({k: x * min(1.0, 1.0 / n) for k, x in v.items()})
  _assert_tree_close(out.result, _weighted_mean(clipped, WEIGHTS))
  norms = [_norm(_client(c)) for c in range(5)]
  assert int(out.measurements['clipped_count']) == sum(n > 1.0 for n in norms)
  assert float(out.measurements['clipping_norm']) == 1.0
  assert 'total_weight' in out.measurements['clipping']
  assert norms[0] < 1.0  # the smallest value passes untouched
  small = AGG.clipping_factory(100.0, AGG.MeanFactory()).create(SPEC)
  _assert_tree_close(
    small.next(small.initialize(), VALUES, WEIGHTS).result,
    _weighted_mean([_client(c) for c in range(5)], WEIGHTS),
  )


@pytest.mark.parametrize('order', [1.0, 2.0, math.inf])
def test_zeroing_zeroes_large_values_and_keeps_their_weight(order):
  limit = 2.0
  process = AGG.zeroing_factory(limit, AGG.MeanFactory(), norm_order=order).create(SPEC)
  out = process.next(process.initialize(), VALUES, WEIGHTS)
  kept = [
    _client(c) if _norm(_client(c), order) <= limit else {k: 0 * x for k, x in _client(c).items()}
    for c in range(5)
  ]
  _assert_tree_close(out.result, _weighted_mean(kept, WEIGHTS))
  zeroed = sum(_norm(_client(c), order) > limit for c in range(5))
  assert int(out.measurements['zeroed_count']) == zeroed
  assert 0 < zeroed < 5


def test_unweighted_inner_gives_an_unweighted_process():
  process = AGG.zeroing_factory(2.0, AGG.UnweightedMeanFactory()).create(SPEC)
  assert not process.is_weighted
  out = process.next(process.initialize(), VALUES)
  kept = [
    _client(c) if _norm(_client(c), math.inf) <= 2.0 else {k: 0 * x for k, x in _client(c).items()}
    for c in range(5)
  ]
  _assert_tree_close(out.result, _weighted_mean(kept, [1.0] * 5))


def test_adaptive_clip_moves_toward_the_target_quantile_by_the_geometric_rule():
  estimator = AGG.PrivateQuantileEstimationProcess.no_noise(
    initial_estimate=0.5, target_quantile=0.8, learning_rate=0.3
  )
  process = AGG.clipping_factory(estimator, AGG.MeanFactory()).create(SPEC)
  state = process.initialize()
  norms = np.array([_norm(_client(c)) for c in range(5)])
  estimate = 0.5
  for _ in range(4):
    out = process.next(state, VALUES, WEIGHTS)
    assert float(out.measurements['clipping_norm']) == pytest.approx(estimate, rel=1e-6)
    below = np.mean(norms <= estimate)
    estimate *= math.exp(-0.3 * (below - 0.8))
    state = out.state
  assert estimate > 0.5  # more than 20% of the norms lay above: the clip grew


def test_median_trimmed_mean_and_krum_are_exact():
  stacked = {k: jnp.asarray(v) for k, v in VALUES.items()}
  median = AGG.median_factory().create(SPEC)
  _assert_tree_close(
    median.next((), stacked).result, {k: np.median(v, axis=0) for k, v in VALUES.items()}
  )
  trimmed = AGG.trimmed_mean_factory(0.2).create(SPEC)
  want = {k: np.sort(v, axis=0)[1:4].mean(axis=0) for k, v in VALUES.items()}
  _assert_tree_close(trimmed.next((), stacked).result, want)
  # Krum with f = 1 over 5 clients: each scored by its 2 nearest others.
  flat = np.concatenate([v.reshape(5, -1) for v in VALUES.values()], axis=1).astype(np.float64)
  d = ((flat[:, None] - flat[None]) ** 2).sum(-1)
  scores = [np.sort(np.delete(d[i], i))[:2].sum() for i in range(5)]
  for m in (1, 2):
    chosen = np.argsort(scores, kind='stable')[:m]
    krum = AGG.krum_factory(1, num_selected=m).create(SPEC)
    want = {k: v[chosen].mean(axis=0) for k, v in VALUES.items()}
    _assert_tree_close(krum.next((), stacked).result, want, rtol=1e-5, atol=1e-5)
    assert int(krum.next((), stacked).measurements['byzantine_tolerance_met']) == 1
  with pytest.raises(ValueError, match='num_byzantine=2 needs more than'):
    AGG.krum_factory(2).create(SPEC).next((), stacked)  # 5 clients <= 2f + 2


def test_dp_gaussian_fixed_noise_has_the_stated_stddev_and_is_reproducible():
  spec = {'w': jax.ShapeDtypeStruct((20_000,), jnp.float32)}
  factory = AGG.DifferentiallyPrivateFactory.gaussian_fixed(
    noise_multiplier=2.0, clients_per_round=4, clip=0.5, seed=3
  )
  process = factory.create(spec)
  zeros = {'w': jnp.zeros((4, 20_000), jnp.float32)}
  state = process.initialize()
  first = process.next(state, zeros)
  again = process.next(state, zeros)
  np.testing.assert_array_equal(first.result['w'], again.result['w'])  # keyed by the state
  second = process.next(first.state, zeros)
  assert not np.allclose(first.result['w'], second.result['w'])
  noise = np.asarray(first.result['w']) * 4  # undo the division by clients_per_round
  assert np.std(noise) == pytest.approx(2.0 * 0.5, rel=0.03)
  assert abs(np.mean(noise)) < 0.03


def test_dp_without_noise_is_the_clipped_sum_over_clients_per_round():
  factory = AGG.DifferentiallyPrivateFactory.gaussian_fixed(0.0, clients_per_round=10, clip=1.0)
  process = factory.create(SPEC)
  out = process.next(process.initialize(), VALUES)
  clipped = [
    {k: x * min(1.0, 1.0 / _norm(_client(c))) for k, x in _client(c).items()} for c in range(5)
  ]
  _assert_tree_close(out.result, {k: sum(v[k] for v in clipped) / 10 for k in VALUES})
  assert int(out.measurements['dp_query_metrics']['clipped_count']) == sum(
    _norm(_client(c)) > 1.0 for c in range(5)
  )


def test_dp_adaptive_splits_the_noise_between_value_and_count():
  factory = AGG.DifferentiallyPrivateFactory.gaussian_adaptive(1.0, clients_per_round=100)
  # TFF's default count stddev 0.05 * 100 = 5: value noise (1 - 1/100)^(-1/2).
  assert factory._value_noise_multiplier == pytest.approx((1 - (2 * 5.0) ** -2) ** -0.5)
  process = factory.create(SPEC)
  state = process.initialize()
  out = process.next(state, VALUES)
  # The clip reported is the one after the round's update (TFF's), the next round's clip.
  clip = float(out.measurements['dp_query_metrics']['clip'])
  assert clip == float(out.state.clip.estimate) and clip != pytest.approx(0.1)


def _adaptive_dp_reference(clip, clients_per_round, rounds):
  """TF Privacy's QuantileAdaptiveClipSumQuery in a NormalizedQuery, without noise, in numpy:
  per round (result, clip after the round's update). The below-clip fraction sums the clients'
  `below - 1/2` over `clients_per_round` (QuantileEstimatorQuery), + 1/2, clipped to [0, 1]."""
  clients = [_client(c) for c in range(5)]
  norms = np.array([_norm(c) for c in clients])
  out = []
  for _ in range(rounds):
    clipped = [
      {k: x * min(1.0, clip / n) for k, x in c.items()} for c, n in zip(clients, norms, strict=True)
    ]
    result = {k: sum(c[k] for c in clipped) / clients_per_round for k in VALUES}
    below = np.clip(np.sum((norms <= clip) - 0.5) / clients_per_round + 0.5, 0.0, 1.0)
    clip = clip * math.exp(-0.2 * (below - 0.5))
    out.append((result, clip))
  return out


@pytest.mark.parametrize('clipped_count_stddev', [None, 1e-7], ids=['no_noise', 'tiny_noise'])
def test_dp_adaptive_clip_is_tf_privacys_over_the_expected_clients_whatever_the_noise(
  clipped_count_stddev,
):
  """With zero noise (and with a tiny one, no jump between them), 5 clients of an expected 10:
  the fraction below the clip divides by 10, and `clip` reports the clip after the update."""
  factory = AGG.DifferentiallyPrivateFactory.gaussian_adaptive(
    0.0, 10, initial_l2_norm_clip=1.0, clipped_count_stddev=clipped_count_stddev
  )
  process = factory.create(SPEC)
  state = process.initialize()
  norms = np.array([_norm(_client(c)) for c in range(5)])
  clip = 1.0
  for result, next_clip in _adaptive_dp_reference(1.0, 10, rounds=4):
    out = process.next(state, VALUES)
    _assert_tree_close(out.result, result, rtol=1e-5, atol=1e-6)
    measured = out.measurements['dp_query_metrics']
    assert float(measured['clip']) == pytest.approx(next_clip, rel=1e-5)
    assert int(measured['clipped_count']) == int(np.sum(norms > clip))
    state, clip = out.state, next_clip
  assert clip != pytest.approx(1.0)


def test_dp_noise_is_keyed_by_the_seed():
  """Two seeds draw different noise, one seed the same; an adaptive clip's count noise is a
  stream of its own (not the value noise of the next seed)."""
  zeros = {'w': jnp.zeros((4, 1000), jnp.float32)}
  spec = {'w': jax.ShapeDtypeStruct((1000,), jnp.float32)}

  def noise(seed):
    process = AGG.DifferentiallyPrivateFactory.gaussian_fixed(1.0, 4, 0.5, seed=seed).create(spec)
    return np.asarray(process.next(process.initialize(), zeros).result['w'])

  np.testing.assert_array_equal(noise(3), noise(3))
  assert not np.allclose(noise(3), noise(4))

  def adaptive(seed):
    factory = AGG.DifferentiallyPrivateFactory.gaussian_adaptive(1.0, 100, seed=seed)
    return factory.create(SPEC).initialize()

  first, again, second = adaptive(0), adaptive(0), adaptive(1)
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  keys = [np.asarray(k) for k in (first.rng, first.clip.rng, second.rng, second.clip.rng)]
  assert len({k.tobytes() for k in keys}) == 4  # four independent streams
  with pytest.raises(ValueError, match=r'seed must be an int in \[0, 2\*\*32\); got 4294967296'):
    AGG.DifferentiallyPrivateFactory.gaussian_fixed(1.0, 4, 0.5, seed=2**32)
  with pytest.raises(TypeError, match="seed must be an int; got '1'"):
    AGG.dp_aggregator(1.0, 100, seed='1')


@pytest.mark.parametrize(
  'build',
  [
    lambda: AGG.clipping_factory(-1.0, AGG.MeanFactory()),
    lambda: AGG.clipping_factory(float('nan'), AGG.MeanFactory()),
    lambda: AGG.zeroing_factory(1.0, AGG.MeanFactory(), norm_order=3.0),
    lambda: AGG.PrivateQuantileEstimationProcess.no_noise(1.0, 1.5, 0.2),
    lambda: AGG.PrivateQuantileEstimationProcess.no_noise(0.0, 0.5, 0.2),
    lambda: AGG.trimmed_mean_factory(0.5),
    lambda: AGG.krum_factory(-1),
    lambda: AGG.DifferentiallyPrivateFactory.gaussian_fixed(-1.0, 10, 1.0),
    lambda: AGG.DifferentiallyPrivateFactory.gaussian_fixed(1.0, 10, float('inf')),
    lambda: AGG.DifferentiallyPrivateFactory.gaussian_adaptive(1.0, 10, clipped_count_stddev=0.1),
  ],
)
def test_bad_arguments_are_rejected_at_construction(build):
  with pytest.raises(ValueError):
    build()


def test_a_weighted_inner_factory_cannot_count():
  with pytest.raises(TypeError, match='clipped_count_sum_factory must create an unweighted'):
    AGG.clipping_factory(
      1.0, AGG.MeanFactory(), clipped_count_sum_factory=AGG.MeanFactory()
    ).create(SPEC)


# Streaming through FedAvg rounds equals the stacked numpy reference.

LAYOUTS = ['chunk1', 'chunk3', 'mesh8']


def _layout(layout):
  """(client_chunk_size, mesh) of a layout: chunks of 1 or 3 on one device, or 8 devices."""
  if layout != 'mesh8':
    return {'chunk1': 1, 'chunk3': 3}[layout], None
  if jax.device_count() < 8:
    pytest.skip('needs 8 devices')
  return None, Mesh(np.array(jax.devices()[:8]), ('clients',))


FACTORIES = {
  'clip': lambda: AGG.clipping_factory(0.05, AGG.MeanFactory()),
  'zero': lambda: AGG.zeroing_factory(0.05, AGG.MeanFactory(), norm_order=2.0),
  'adaptive_clip': lambda: AGG.clipping_factory(
    AGG.PrivateQuantileEstimationProcess.no_noise(0.02, 0.5, 0.5), AGG.MeanFactory()
  ),
  'dp': lambda: AGG.DifferentiallyPrivateFactory.gaussian_fixed(0.0, 7, 0.05),
}


def _round_reference(name, deltas, weights, estimate):
  """The aggregate of stacked client deltas, in numpy, and the next adaptive estimate."""
  clients = [{k: np.asarray(v[c], np.float64) for k, v in deltas.items()} for c in range(7)]
  norms = [_norm(c) for c in clients]
  if name in ('clip', 'adaptive_clip', 'dp'):
    limit = estimate if name == 'adaptive_clip' else 0.05
    kept = [
      {k: x * limit / max(n, limit) for k, x in c.items()}
      for c, n in zip(clients, norms, strict=True)
    ]
  else:
    kept = [
      c if n <= 0.05 else {k: 0 * x for k, x in c.items()}
      for c, n in zip(clients, norms, strict=True)
    ]
  if name == 'dp':
    mean = {k: sum(c[k] for c in kept) / 7 for k in kept[0]}
  else:
    total = sum(weights)
    mean = {k: sum(w * c[k] for c, w in zip(kept, weights, strict=True)) / total for k in kept[0]}
  # A client without an example takes no part (padding is invisible), in the quantile too.
  below = np.mean([n <= estimate for n, w in zip(norms, weights, strict=True) if w > 0])
  return mean, estimate * math.exp(-0.5 * (below - 0.5))


@pytest.mark.parametrize('name', sorted(FACTORIES))
@pytest.mark.parametrize('layout', LAYOUTS)
def test_streamed_rounds_equal_the_stacked_numpy_reference(name, layout):
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 2, 14, 5, 0, 7, 4]), batch_size=4)
  chunk, mesh = _layout(layout)
  builder = fl.algorithms.build_unweighted_fed_avg if name == 'dp' else None
  builder = builder or fl.algorithms.build_weighted_fed_avg
  process = builder(
    model,
    fl.optimizers.build_sgdm(0.1),
    model_aggregator=FACTORIES[name](),
    client_chunk_size=chunk,
    mesh=mesh,
  )
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
  state = process.initialize()
  weights = {k: np.asarray(v, np.float64) for k, v in model.initial_weights.trainable.items()}
  estimate = 0.02
  for _ in range(2):
    trainable = {k: jnp.asarray(v, jnp.float32) for k, v in weights.items()}
    stacked = work.next(work.initialize(), fl.ModelWeights(trainable, ()), batches).result
    mean, estimate_next = _round_reference(
      name, stacked.update, np.asarray(stacked.update_weight), estimate
    )
    state, _ = process.next(state, batches)
    weights = {k: weights[k] - mean[k] for k in weights}
    got = process.get_model_weights(state).trainable
    for k in weights:
      np.testing.assert_allclose(got[k], weights[k], rtol=2e-5, atol=2e-6)
    estimate = estimate_next


def test_weighted_and_unweighted_factories_interoperate_as_tffs():
  # An unweighted factory where FedAvg weights its clients: the weights are not used (TFF's rule).
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 2, 14]), batch_size=4)
  weighted = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=AGG.UnweightedMeanFactory()
  )
  uniform = fl.algorithms.build_unweighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=AGG.UnweightedMeanFactory()
  )
  s1, _ = weighted.next(weighted.initialize(), batches)
  s2, _ = uniform.next(uniform.initialize(), batches)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6)
  # A weighted factory where only an unweighted sum can go: a clear error.
  with pytest.raises(TypeError, match='value_sum_factory must create an unweighted'):
    AGG.MeanFactory(value_sum_factory=AGG.MeanFactory()).create(SPEC)


@pytest.mark.parametrize(
  'factory',
  [
    lambda: AGG.MeanFactory(value_sum_factory=AGG.QuantizationFactory(2, 1, 'hadamard')),
    lambda: AGG.MeanFactory(value_sum_factory=AGG.SecureSumFactory(0.05, bits=24)),
  ],
  ids=['compression', 'secure'],
)
@pytest.mark.parametrize('layout', LAYOUTS)
def test_randomized_and_integer_sums_stream_like_their_stacked_form(factory, layout):
  """Quantization keyed by client id and uint32 sums wrapping modulo 2^32 give the same round
  through the cohort loop (chunks, devices) as through the stacked `next`."""
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(
    ref.random_clients([9, 2, 14, 5, 0, 7, 4]), batch_size=4, client_keys=range(7)
  )
  chunk, mesh = _layout(layout)
  work = fl.templates.build_model_delta_client_work(
    model, fl.optimizers.build_sgdm(0.1), client_chunk_size=chunk, mesh=mesh
  )
  spec = fl.tree.tree_specs(model.initial_weights)

  def compose(client_work):
    return fl.templates.compose_learning_process(
      lambda: model.initial_weights,
      fl.templates.build_broadcast_process(spec),
      client_work,
      factory().create(spec.trainable),
      fl.templates.build_apply_optimizer_finalizer(fl.optimizers.build_sgdm(1.0), spec),
    )

  streamed, stacked = compose(work), compose(work._replace(streams=False))
  s1, s2 = streamed.initialize(), stacked.initialize()
  for _ in range(2):
    s1, m1 = streamed.next(s1, batches)
    s2, m2 = stacked.next(s2, batches)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
