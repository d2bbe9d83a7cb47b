"""TFF's recommended aggregators for model updates (`tff.learning.robust_aggregator`,
`tff.learning.dp_aggregator`), with its defaults."""

from __future__ import annotations

import math
from typing import Any

from fedjax_lite.aggregators import (
  _compression,
  _differential_privacy,
  _factories,
  _quantile,
  _robust,
  _secure,
)


def default_zeroing(inner_factory: Any) -> Any:
  """Adaptive zeroing that settles somewhat above the largest norms seen (TFF's default): the
  L-infinity norm, its 0.98 quantile estimated from 10 with rate ln 10, reported ×2 + 1."""
  zeroing_norm = _quantile.PrivateQuantileEstimationProcess.no_noise(
    initial_estimate=10.0,
    target_quantile=0.98,
    learning_rate=math.log(10.0),
    multiplier=2.0,
    increment=1.0,
  )
  return _robust.zeroing_factory(zeroing_norm, inner_factory)


def default_clipping(inner_factory: Any) -> Any:
  """Adaptive L2 clipping at the 0.8 quantile of the norms, from 1.0 with rate 0.2 (TFF's)."""
  clipping_norm = _quantile.PrivateQuantileEstimationProcess.no_noise(
    initial_estimate=1.0, target_quantile=0.8, learning_rate=0.2
  )
  return _robust.clipping_factory(clipping_norm, inner_factory)


def _guarded_mean(value_sum_factory: Any, zeroing: bool, clipping: bool, weighted: bool) -> Any:
  """A (weighted or unweighted) mean over `value_sum_factory`, inside the default adaptive
  clipping, inside the default adaptive zeroing: the shape of TFF's presets."""
  if weighted:
    factory = _factories.MeanFactory(value_sum_factory=value_sum_factory)
  else:
    factory = _factories.UnweightedMeanFactory(value_sum_factory=value_sum_factory)
  if clipping:
    factory = default_clipping(factory)
  if zeroing:
    factory = default_zeroing(factory)
  return factory


def robust_aggregator(zeroing: bool = True, clipping: bool = True, weighted: bool = True) -> Any:
  """A mean with adaptive zeroing (robust to corrupted updates) around adaptive clipping (robust
  to outliers): TFF's `robust_aggregator` and the default it recommends for FedAvg."""
  return _guarded_mean(None, zeroing, clipping, weighted)


def dp_aggregator(
  noise_multiplier: float, clients_per_round: float, zeroing: bool = True, *, seed: int = 0
) -> Any:
  """DP-FedAvg with an adaptive clip (`DifferentiallyPrivateFactory.gaussian_adaptive`, TFF's
  defaults: clip from 0.1 toward the median norm at rate 0.2), zeroing outliers first. An
  unweighted aggregator: use it with `build_unweighted_fed_avg`. Account for it with
  `PrivacyAccountant(noise_multiplier, clients_per_round, population, delta)`. `seed` keys the
  noise (TFF draws it from a fresh seed): give each run its own."""
  factory = _differential_privacy.DifferentiallyPrivateFactory.gaussian_adaptive(
    noise_multiplier=noise_multiplier,
    clients_per_round=clients_per_round,
    initial_l2_norm_clip=0.1,
    target_unclipped_quantile=0.5,
    learning_rate=0.2,
    seed=seed,
  )
  return default_zeroing(factory) if zeroing else factory


def compression_aggregator(
  zeroing: bool = True, clipping: bool = True, weighted: bool = True, *, bits: int = 8
) -> Any:
  """A mean whose value sum is quantized to `bits` (TFF: 8) bits per coordinate for leaves of at
  least 20,000 elements (TFF's `compression_aggregator` and its `quantize_above_threshold`
  defaults), with adaptive clipping and zeroing around it."""
  quantized = _compression.QuantizationFactory(bits=bits, threshold=20000)
  return _guarded_mean(quantized, zeroing, clipping, weighted)


def secure_aggregator(zeroing: bool = True, clipping: bool = True, weighted: bool = True) -> Any:
  """A mean whose value sum is a (simulated) secure sum with an adaptive bound — the 0.95
  quantile of the clients' largest absolute values, from 50 at rate 1, reported ×2 (TFF's
  `secure_aggregator` defaults) — with adaptive clipping and zeroing around it. The weights are
  summed in the clear here (TFF sums them securely too; counts lose nothing either way)."""
  bound = _quantile.PrivateQuantileEstimationProcess.no_noise(
    initial_estimate=50.0, target_quantile=0.95, learning_rate=1.0, multiplier=2.0
  )
  return _guarded_mean(_secure.SecureSumFactory(bound), zeroing, clipping, weighted)
