"""DP-FTRL's correlated-noise aggregation (tree, banded, BLT) and its accounting, against
materialized matrices, TF Privacy's tree recursion in numpy, jax-privacy and dp-accounting."""

import itertools
import math

import dp_accounting
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest
from dp_accounting import pld
from jax_privacy.matrix_factorization import buffered_toeplitz as jp_blt
from jax_privacy.matrix_factorization import sensitivity as jp_sensitivity
from jax_privacy.matrix_factorization import toeplitz as jp_toeplitz

import fedjax_lite as fl
from fedjax_lite.aggregators import _dp_ftrl_accounting, _quantile

AGG = fl.aggregators
ROUNDS = 13
SPEC = {
  'a': jax.ShapeDtypeStruct((2, 3), jnp.float32),
  'b': jax.ShapeDtypeStruct((4,), jnp.float32),
}


def _blt_strategy():
  """A small valid BLT (jax-privacy's rational approximation of 1/sqrt(1 - x), 2 buffers):
  optimizing one takes ~20 s on CPU, so the tests hand it in as a strategy."""
  with jax.enable_x64(True):
    blt = jp_blt.BufferedToeplitz.from_rational_approx_to_sqrt_x(
      2, max_buf_decay=1 - 1e-6, max_pillutla_score=1 - 1e-6
    )
    return np.asarray(blt.buf_decay), np.asarray(blt.output_scale)


BANDED_COEFS = np.array([0.8, 0.48, 0.36]) / np.linalg.norm([0.8, 0.48, 0.36])
MECHANISMS = {
  'tree': lambda n=ROUNDS, b=3: AGG.build_dp_ftrl_mechanism('tree', n, min_separation=b),
  'banded': lambda n=ROUNDS, b=3: AGG.build_dp_ftrl_mechanism(
    'banded', n, min_separation=b, strategy=BANDED_COEFS
  ),
  'blt': lambda n=ROUNDS, b=3: AGG.build_dp_ftrl_mechanism(
    'blt', n, min_separation=b, strategy=_blt_strategy()
  ),
}


def _zeros(clients=2):
  return {k: jnp.zeros((clients, *s.shape), s.dtype) for k, s in SPEC.items()}


def _run(process, rounds, values, state=None):
  step = jax.jit(process.next)
  state = process.initialize() if state is None else state
  results = []
  for _ in range(rounds):
    out = step(state, values)
    state = out.state
    results.append(out.result)
  return state, results


def _replayed_z(mechanism, seed, rounds, stddev):
  """Z from the aggregator's key stream, read as its docstring says: per round split the state
  key, one key per value leaf (in tree order), `stddev · normal(key)` (matrices) or
  `normal(fold_in(key, level))` per level (tree, indexed as `strategy_matrix`'s nodes)."""
  rng = _quantile.noise_key(seed, _quantile.VALUE_STREAM)
  leaves = jax.tree.leaves(SPEC)
  per_leaf = [[] for _ in leaves]
  for _ in range(rounds):
    key, rng = jax.random.split(rng)
    for i, (k, s) in enumerate(zip(jax.random.split(key, len(leaves)), leaves, strict=True)):
      if mechanism.name == 'tree':
        draws = [jax.random.normal(jax.random.fold_in(k, d), s.shape) for d in range(8)]
        per_leaf[i].append(np.stack([np.asarray(x).ravel() for x in draws]))
      else:
        per_leaf[i].append(np.asarray(jax.random.normal(k, s.shape)).ravel())
  out = []
  for draws in per_leaf:
    draws = np.stack(draws).astype(np.float64) * stddev
    if mechanism.name == 'tree':  # node (level, j) is drawn in the round its last leaf arrives
      nodes = [(lv, j) for lv in range(8) for j in range(rounds // 2**lv) if 2**lv <= rounds]
      draws = np.stack([draws[(j + 1) * 2**lv - 1, lv] for lv, j in nodes])
    out.append(draws)
  return out


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_streamed_noise_is_the_materialized_noising_matrix_times_z(name):
  mechanism = MECHANISMS[name]()
  strategy, noising = mechanism.strategy_matrix(), mechanism.noising_matrix()
  np.testing.assert_allclose(noising @ strategy, np.eye(ROUNDS), atol=1e-9)  # C⁺C = I
  factory = AGG.DPFTRLFactory(0.7, 2.0, 1.5, mechanism, seed=5)
  _, results = _run(factory.create(SPEC), ROUNDS, _zeros())
  z = _replayed_z(mechanism, 5, ROUNDS, 0.7 * 1.5)
  for i, key in enumerate(sorted(SPEC)):
    streamed = np.stack([np.asarray(r[key]).ravel() for r in results]) * 2.0
    np.testing.assert_allclose(streamed, noising @ z[i], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_noise_covariance_is_the_matrix_s(name):
  """20,000 coordinates are 20,000 independent draws of the 6 rounds' noise."""
  mechanism = MECHANISMS[name](n=6)
  spec = {'w': jax.ShapeDtypeStruct((20_000,), jnp.float32)}
  process = AGG.DPFTRLFactory(1.0, 1.0, 1.0, mechanism, seed=1).create(spec)
  _, results = _run(process, 6, {'w': jnp.zeros((1, 20_000))})
  noise = np.stack([np.asarray(r['w'], np.float64) for r in results])
  noising = mechanism.noising_matrix()
  want = noising @ noising.T
  np.testing.assert_allclose(np.cov(noise), want, atol=0.05 * np.abs(want).max())


def _tf_privacy_residual_coefficients(rounds):
  """TF Privacy's `EfficientTreeAggregator` + `TreeResidualSumQuery` in numpy over symbolic
  noises: every node value is a coefficient vector over the i.i.d. node noises drawn so far; the
  state is (level_buffer, level_buffer_idx) exactly as `get_cumsum_and_update` keeps it.
  Returns `[rounds, draws]`: each round's residual noise in units of the node stddev."""
  draws = []

  def draw():
    draws.append(len(draws))
    vec = np.zeros(4 * rounds + 8)
    vec[draws[-1]] = 1.0
    return vec

  level_buffer, level_idx = [draw()], [0]  # init_state: one leaf
  previous = np.zeros_like(level_buffer[0])
  residuals = []
  for _ in range(rounds):
    weights = [1.0 / (2.0 - 0.5**i) for i in level_idx]
    cumsum = sum(w * v for w, v in zip(weights, level_buffer, strict=True))
    residuals.append(cumsum - previous)
    previous = cumsum
    new_value, level = draw(), 0
    while level < len(level_idx) and level_idx[level] == level:
      new_value = 0.5 * (level_buffer[level] + new_value) + draw()
      level += 1
    level_buffer = [new_value, *level_buffer[level:]]
    level_idx = [level, *level_idx[level:]]
  return np.stack(residuals)


def test_tree_has_tff_087_tree_aggregation_per_round_noise_variance():
  rounds = 40
  tff = _tf_privacy_residual_coefficients(rounds)
  tff_variance = (tff**2).sum(axis=1)
  mechanism = AGG.build_dp_ftrl_mechanism('tree', rounds)
  ours = mechanism.noising_matrix()
  np.testing.assert_allclose((ours**2).sum(axis=1), tff_variance, rtol=1e-12)
  # And the whole covariance, not only its diagonal (the same estimator, another node order).
  np.testing.assert_allclose(ours @ ours.T, tff @ tff.T, atol=1e-12)
  # By hand: round 0 is one leaf (1); round 1 is (2/3)(z_node + (z0 + z1)/2) - z0 (1 again);
  # round 2 adds leaf 2 alone on top of the level-1 estimate (variance 1).
  np.testing.assert_allclose(tff_variance[:3], [1.0, 1.0, 1.0])


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_without_noise_every_mechanism_is_the_clipped_mean(name):
  rng = np.random.default_rng(0)
  values = {
    k: (rng.standard_normal((5, *s.shape)) * np.arange(1, 6).reshape(5, *[1] * len(s.shape)))
    for k, s in SPEC.items()
  }
  values = {k: v.astype(np.float32) for k, v in values.items()}
  factory = AGG.DPFTRLFactory(0.0, 8.0, 2.0, MECHANISMS[name](), seed=0)
  state, results = _run(factory.create(SPEC), 3, values)
  norms = np.sqrt(sum((v.reshape(5, -1).astype(np.float64) ** 2).sum(1) for v in values.values()))
  scale = np.minimum(1.0, 2.0 / norms)
  for result in results:
    for k, v in values.items():
      want = (v * scale.reshape(5, *[1] * (v.ndim - 1))).sum(0) / 8.0
      np.testing.assert_allclose(result[k], want, rtol=1e-5, atol=1e-6)
  assert int(state.round_num) == 3


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_noise_is_reproducible_from_the_state_and_a_resumed_run_is_bitwise(name):
  process = AGG.DPFTRLFactory(1.0, 2.0, 1.0, MECHANISMS[name](), seed=3).create(SPEC)
  state = process.initialize()
  first, again = process.next(state, _zeros()), process.next(state, _zeros())
  for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert jax.eval_shape(process.initialize) == jax.eval_shape(process.next, state, _zeros()).state
  _, whole = _run(process, 7, _zeros())
  middle, head = _run(process, 3, _zeros())
  saved = jax.tree.map(lambda x: np.array(x, copy=True), middle)  # a checkpoint on the host
  restored = jax.tree.map(jnp.asarray, saved)
  _, tail = _run(process, 4, _zeros(), state=restored)
  for a, b in zip(jax.tree.leaves(whole), jax.tree.leaves(head + tail), strict=True):
    np.testing.assert_array_equal(a, b)
  other = AGG.DPFTRLFactory(1.0, 2.0, 1.0, MECHANISMS[name](), seed=4).create(SPEC)
  assert not np.allclose(other.next(other.initialize(), _zeros()).result['b'], first.result['b'])


def test_one_band_is_dp_fedavgs_independent_noise():
  """C = I (one band, separation 1): DP-FTRL's noise is DP-FedAvg's draw for draw."""
  mechanism = AGG.build_dp_ftrl_mechanism('banded', 5)
  assert mechanism.buffers == 0 and mechanism.sensitivity() == pytest.approx(math.sqrt(5))
  ftrl = AGG.DPFTRLFactory(1.3, 4.0, 0.5, mechanism, seed=2).create(SPEC)
  fedavg = AGG.DifferentiallyPrivateFactory.gaussian_fixed(1.3, 4, 0.5, seed=2).create(SPEC)
  _, a = _run(ftrl, 3, _zeros())
  _, b = _run(fedavg, 3, _zeros())
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)


def _direct_epsilon(multiplier, delta):
  accountant = pld.PLDAccountant()
  accountant.compose(dp_accounting.GaussianDpEvent(multiplier))
  return accountant.get_epsilon(delta)


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_epsilon_is_jax_privacy_sensitivity_then_dp_accounting(name):
  mechanism = MECHANISMS[name]()
  b, k = mechanism.min_separation, mechanism.max_participations
  assert k == math.ceil(ROUNDS / b)
  for rounds in (ROUNDS, 7):
    c = mechanism.strategy_matrix(rounds)
    k_r = min(k, math.ceil(rounds / b))
    if name == 'banded':  # sqrt(k_r): jax-privacy's bound for column-normalized bands <= b
      exact = jp_sensitivity.get_sensitivity_banded(jnp.asarray(c), b, k_r)  # checks orthogonality
      sens = math.sqrt(k_r)
      assert exact <= sens + 1e-6 and (rounds < ROUNDS or exact == pytest.approx(sens, rel=1e-6))
    elif name == 'blt':
      with jax.enable_x64(True):
        sens = math.sqrt(jp_toeplitz.minsep_sensitivity_squared(c[:, 0], b, k_r))
    else:
      sens = jp_sensitivity.get_min_sep_sensitivity_upper_bound(jnp.asarray(c), b, k_r)
    for neighboring, factor in [('replace_one', 2.0), ('zero_out', 1.0)]:
      accountant = AGG.DPFTRLAccountant(mechanism, 3.0, 1e-6, neighboring=neighboring)
      want = _direct_epsilon(3.0 / (factor * sens), 1e-6)
      assert accountant.epsilon(rounds) == pytest.approx(want, rel=1e-4)
  assert 'replace-one' in AGG.DPFTRLAccountant(mechanism, 3.0, 1e-6).assumption


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_epsilon_grows_with_rounds_and_costs_more_under_replace_one(name):
  mechanism = MECHANISMS[name]()
  replace = AGG.DPFTRLAccountant(mechanism, 4.0, 1e-5)
  eps = [replace.epsilon(r) for r in (0, 1, 4, 7, 10, ROUNDS)]
  assert eps[0] == 0.0 and all(a < b for a, b in itertools.pairwise(eps))
  assert AGG.DPFTRLAccountant(mechanism, 4.0, 1e-5, neighboring='zero_out').epsilon(
    ROUNDS
  ) < replace.epsilon(ROUNDS)


def test_a_schedule_the_analysis_does_not_cover_is_refused():
  banded = MECHANISMS['banded']()
  with pytest.raises(ValueError, match='rounds=14 exceeds the total_rounds=13'):
    AGG.DPFTRLAccountant(banded, 1.0, 1e-6).epsilon(14)
  with pytest.raises(ValueError, match=r'min_separation=2 does not match .* min_separation=3'):
    AGG.DPFTRLAccountant(banded, 1.0, 1e-6, min_separation=2)
  with pytest.raises(ValueError, match='max_participations=9 does not match'):
    AGG.DPFTRLAccountant(banded, 1.0, 1e-6, max_participations=9)
  with pytest.raises(ValueError, match='bands=3 exceeds min_separation=2'):
    AGG.build_dp_ftrl_mechanism('banded', 13, min_separation=2, strategy=BANDED_COEFS)
  with pytest.raises(ValueError, match=r'min_separation must be in \[1, total_rounds=13\]'):
    AGG.build_dp_ftrl_mechanism('tree', 13, min_separation=14)
  increasing = ([0.9], [-0.5])  # Toeplitz coefficients 1, -0.5, ...: jax-privacy refuses them
  blt = AGG.build_dp_ftrl_mechanism('blt', 13, min_separation=3, strategy=increasing)
  with pytest.raises(ValueError, match='coef must be non-negative'):
    AGG.DPFTRLAccountant(blt, 1.0, 1e-6).epsilon(13)
  with pytest.raises(ValueError, match="mechanism must be one of \\('tree', 'banded', 'blt'\\)"):
    AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism='dense', total_rounds=5)
  with pytest.raises(ValueError, match='total_rounds is required'):
    AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism='tree')
  with pytest.raises(ValueError, match='total_rounds=12 does not match the banded mechanism'):
    AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism=banded, total_rounds=12)
  with pytest.raises(ValueError, match='noise_multiplier must be >= 0; got -1'):
    AGG.dp_ftrl_aggregator(-1.0, 10, 1.0, mechanism='tree', total_rounds=5)
  with pytest.raises(ValueError, match='noise_multiplier must be > 0 to account for'):
    AGG.DPFTRLAccountant('tree', 0.0, 1e-6, total_rounds=5)


def test_banded_strategy_is_optimized_by_jax_privacy_and_shared_with_the_accountant():
  factory = AGG.dp_ftrl_aggregator(
    1.0, 10, 1.0, mechanism='banded', total_rounds=12, min_separation=3, seed=1
  )
  mechanism = factory.mechanism
  assert mechanism.strategy.shape == (3,) and mechanism.buffers == 2
  assert np.linalg.norm(mechanism.strategy) == pytest.approx(1.0, abs=1e-6)
  assert mechanism.sensitivity() == pytest.approx(2.0)  # column norms 1, k = 4 participations
  by_name = AGG.DPFTRLAccountant('banded', 1.0, 1e-6, total_rounds=12, min_separation=3)
  assert np.shares_memory(by_name.mechanism.strategy, mechanism.strategy)  # the cached one
  assert by_name.epsilon(12) == AGG.DPFTRLAccountant(mechanism, 1.0, 1e-6).epsilon(12)
  tree = AGG.DPFTRLFactory.tree_aggregation(1.0, 10, 1.0, total_rounds=12)
  assert tree.mechanism.name == 'tree' and tree.mechanism.buffers == 5  # 4 levels + previous


def test_fed_avg_with_dp_ftrl_trains_and_without_noise_is_dp_fedavgs_rounds():
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 6, 14, 5, 7, 8]), batch_size=4)

  def build(aggregator):
    return fl.algorithms.build_weighted_fed_avg(
      model,
      fl.optimizers.build_sgdm(0.2),
      fl.optimizers.build_sgdm(1.0, momentum=0.9),  # DP-FTRL with momentum
      model_aggregator=aggregator,
      client_chunk_size=3,
    )

  quiet = build(AGG.dp_ftrl_aggregator(0.0, 6, 1.0, mechanism='tree', total_rounds=8))
  fedavg = build(AGG.DifferentiallyPrivateFactory.gaussian_fixed(0.0, 6, 1.0))
  noisy = build(AGG.dp_ftrl_aggregator(0.05, 6, 1.0, mechanism='tree', total_rounds=8, seed=1))
  s1, s2, s3 = quiet.initialize(), fedavg.initialize(), noisy.initialize()
  losses = []
  for _ in range(3):
    s1, _ = quiet.next(s1, batches)
    s2, _ = fedavg.next(s2, batches)
    s3, metrics = noisy.next(s3, batches)
    losses.append(float(metrics['client_work']['train']['loss']))
  for a, b in zip(
    jax.tree.leaves(quiet.get_model_weights(s1)),
    jax.tree.leaves(fedavg.get_model_weights(s2)),
    strict=True,
  ):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert all(map(math.isfinite, losses)) and losses[-1] < losses[0]


@pytest.mark.parametrize('name', sorted(MECHANISMS))
def test_past_total_rounds_every_aggregate_is_nan_never_a_noiseless_sum(name):
  """The tree's noise is exactly 0 at round index 2^levels - 1 = 7 (the first past 7 rounds):
  past the horizon the aggregator releases NaN instead."""
  factory = AGG.DPFTRLFactory(1.0, 2.0, 1.0, MECHANISMS[name](n=7), seed=0)
  assert factory.total_rounds == factory.mechanism.total_rounds == 7
  values = {k: jnp.ones((2, *s.shape), s.dtype) for k, s in SPEC.items()}
  state, results = _run(factory.create(SPEC), 9, values)
  assert int(state.round_num) == 9
  for r, result in enumerate(results):
    for leaf in jax.tree.leaves(result):
      assert np.isfinite(leaf).all() if r < 7 else np.isnan(leaf).all(), (r, leaf)


def test_a_participation_cap_no_sampler_enforces_is_refused():
  below = r'max_participations=4 is below ceil\(total_rounds / min_separation\) .* = 5'
  with pytest.raises(ValueError, match=below + r'.*min_separation=3\) draws lets a client'):
    AGG.build_dp_ftrl_mechanism('tree', 13, min_separation=3, max_participations=4)
  with pytest.raises(ValueError, match=below):
    AGG.dp_ftrl_aggregator(
      1.0, 10, 1.0, mechanism='tree', total_rounds=13, min_separation=3, max_participations=4
    )
  with pytest.raises(ValueError, match=below):
    AGG.DPFTRLAccountant('tree', 1.0, 1e-6, total_rounds=13, min_separation=3, max_participations=4)
  with pytest.raises(ValueError, match=below):
    AGG.CorrelatedNoiseMechanism('tree', 13, 3, 4)
  # At or above ceil(n / b) it is what the schedule allows: k = 5.
  assert (
    AGG.build_dp_ftrl_mechanism(
      'tree', 13, min_separation=3, max_participations=9
    ).max_participations
    == 5
  )


def test_a_built_mechanism_refuses_another_schedule_but_accepts_its_own():
  banded = MECHANISMS['banded']()  # 13 rounds, b = 3, 3 bands
  for name, value in [
    ('min_separation', 1),
    ('bands', 2),
    ('max_participations', 4),
    ('total_rounds', 14),
  ]:
    with pytest.raises(ValueError, match=f'{name}={value} does not match the banded mechanism'):
      AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism=banded, **{name: value})
  own = {'total_rounds': 13, 'min_separation': 3, 'max_participations': 5, 'bands': 3}
  assert AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism=banded, **own).mechanism is banded
  assert AGG.DPFTRLAccountant(banded, 1.0, 1e-6, **own).mechanism is banded
  with pytest.raises(ValueError, match='bands=1 does not match the banded mechanism'):
    AGG.DPFTRLAccountant(banded, 1.0, 1e-6, bands=1)


def test_the_accountant_by_name_takes_the_factorys_bands():
  kwargs = {'total_rounds': 12, 'min_separation': 3, 'bands': 1}
  factory = AGG.dp_ftrl_aggregator(1.0, 10, 1.0, mechanism='banded', **kwargs)
  by_name = AGG.DPFTRLAccountant('banded', 1.0, 1e-6, **kwargs)
  assert by_name.mechanism.strategy.tolist() == factory.mechanism.strategy.tolist() == [1.0]
  assert by_name.mechanism.sensitivity() == pytest.approx(math.sqrt(4))  # C = I, k = 4
  assert by_name.epsilon(12) == AGG.DPFTRLAccountant(factory.mechanism, 1.0, 1e-6).epsilon(12)
  with pytest.raises(ValueError, match='bands=4 exceeds min_separation=3'):
    AGG.DPFTRLAccountant('banded', 1.0, 1e-6, total_rounds=12, min_separation=3, bands=4)
  with pytest.raises(ValueError, match='bands and strategy do not apply to the tree'):
    AGG.DPFTRLAccountant('tree', 1.0, 1e-6, total_rounds=12, bands=2)


def test_strategies_are_read_only_private_copies():
  coefs = BANDED_COEFS.copy()
  banded = AGG.build_dp_ftrl_mechanism('banded', 13, min_separation=3, strategy=coefs)
  coefs[0] = 0.0  # the caller's array is not the mechanism's
  assert banded.strategy[0] == pytest.approx(BANDED_COEFS[0])
  blt = MECHANISMS['blt']()
  for array in (banded.strategy, *blt.strategy):
    assert not array.flags.writeable
    with pytest.raises(ValueError, match='read-only'):
      array[0] = 0.5
  cached = AGG.build_dp_ftrl_mechanism('banded', 12, min_separation=3, bands=1).strategy
  assert not cached.flags.writeable


def _brute_force_squared_sensitivity(gram, b, k):
  """max over every pattern (<= k rounds, any two >= b apart) of Σ_ij |X_ij| u_i u_j: the
  squared sensitivity when X >= 0 (contributions aligned), an upper bound otherwise."""
  n, best = len(gram), 0.0
  for size in range(1, k + 1):
    for rounds in itertools.combinations(range(n), size):
      if all(j - i >= b for i, j in itertools.pairwise(rounds)):
        best = max(best, np.abs(gram[np.ix_(rounds, rounds)]).sum())
  return best


def test_tree_sensitivity_bounds_every_min_separated_pattern_and_is_jax_privacys_bound():
  for n, b in [(1, 1), (5, 1), (7, 2), (9, 3), (11, 2), (12, 4)]:
    mechanism = AGG.build_dp_ftrl_mechanism('tree', n, min_separation=b)
    previous = 0.0
    for rounds in range(1, n + 1):
      c = mechanism.strategy_matrix(rounds)
      k = min(mechanism.max_participations, math.ceil(rounds / b))
      ours = mechanism.sensitivity(rounds)
      assert ours**2 >= _brute_force_squared_sensitivity(c.T @ c, b, k) - 1e-9
      assert ours >= previous  # non-decreasing: the accountant may round rounds up
      previous = ours
  for n, b, rounds in [(13, 3, 13), (20, 2, 11), (16, 5, 16)]:
    mechanism = AGG.build_dp_ftrl_mechanism('tree', n, min_separation=b)
    k = min(mechanism.max_participations, math.ceil(rounds / b))
    c = jnp.asarray(mechanism.strategy_matrix(rounds), jnp.float32)
    jp = jp_sensitivity.get_min_sep_sensitivity_upper_bound(c, b, k)  # float32
    assert mechanism.sensitivity(rounds) == pytest.approx(jp, rel=1e-6)


def test_tree_epsilon_is_cheap_for_every_round_and_rounds_up_only_when_costly():
  accountant = AGG.DPFTRLAccountant('tree', 2.0, 1e-6, total_rounds=100, min_separation=5)
  eps = [accountant.epsilon(r) for r in range(1, 101)]  # ~0.5 s: every round's own bound
  assert all(a <= b for a, b in itertools.pairwise(eps))
  rounded = _dp_ftrl_accounting._accounted_rounds
  big = AGG.build_dp_ftrl_mechanism('tree', 1000)
  assert [rounded(big, r) for r in (1, 100, 128, 129, 300, 512, 513, 1000)] == [
    1,
    100,
    128,
    256,
    512,
    512,
    1000,
    1000,
  ]


def test_padded_clients_count_in_no_dp_ftrl_sum():
  """Two padded clients (mask 0, NaN data) and a chunk that pads its lanes change nothing: the
  clipped sum, its clipped count and the noise are those of the real clients."""
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 6, 14, 5]), batch_size=4)
  pad = lambda a, fill: np.concatenate([a, np.full((2, *a.shape[1:]), fill, a.dtype)])
  padded = fl.ClientBatches(
    {'x': pad(np.asarray(batches.batch['x']), np.nan), 'y': pad(np.asarray(batches.batch['y']), 0)},
    pad(np.asarray(batches.mask), 0),
  )
  states = []
  for data, chunk in [(batches, 1), (padded, 3)]:
    aggregator = AGG.dp_ftrl_aggregator(0.5, 4, 0.1, mechanism='tree', total_rounds=4, seed=3)
    process = fl.algorithms.build_unweighted_fed_avg(
      model, fl.optimizers.build_sgdm(0.2), model_aggregator=aggregator, client_chunk_size=chunk
    )
    state = process.initialize()
    for _ in range(2):
      state, metrics = process.next(state, data)
    states.append(process.get_model_weights(state))
    assert int(metrics['aggregator']['dp_query_metrics']['clipped_count']) <= 4
  for a, b in zip(*(jax.tree.leaves(s) for s in states), strict=True):
    assert np.all(np.isfinite(b))
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
