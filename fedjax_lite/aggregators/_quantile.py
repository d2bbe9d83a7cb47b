"""Adaptive norms: a quantile of the clients' norms estimated across rounds (Andrew et al., 2021,
"Differentially Private Learning with Adaptive Clipping"), TFF's
`PrivateQuantileEstimationProcess`, streamed through the cohort loop."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.templates import _processes

# `fold_in` streams of one seed's noise keys: the DP value noise and the quantile's count noise
# of the same seed are independent, and seeds s and s + 1 share no key.
VALUE_STREAM, COUNT_STREAM = 0, 1


def check_seed(seed: int) -> int:
  """`seed` as an int in [0, 2**32) (a larger one would wrap onto another seed's key)."""
  if isinstance(seed, bool) or not isinstance(seed, int | np.integer):
    raise TypeError(f'seed must be an int; got {seed!r}')
  if not 0 <= seed < 2**32:
    raise ValueError(f'seed must be an int in [0, 2**32); got {seed}')
  return int(seed)


def noise_key(seed: int, stream: int) -> jax.Array:
  """The `[2] uint32` key of the noise stream `stream` of a `check_seed`ed `seed`."""
  return jax.random.fold_in(jax.random.PRNGKey(seed), stream)


class QuantileEstimatorState(NamedTuple):
  """State of the quantile estimator.

  Attributes:
    estimate: `[] float32` current estimate of the target quantile.
    rng: `[2] uint32` key of the noise added to the below-estimate count.
  """

  estimate: jax.Array
  rng: jax.Array


def _check_positive(**values: float) -> None:
  for name, value in values.items():
    if not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
      raise ValueError(f'{name} must be a finite number > 0; got {value!r}')


def build_quantile_estimator(
  initial_estimate: float,
  target_quantile: float,
  learning_rate: float,
  *,
  multiplier: float = 1.0,
  increment: float = 0.0,
  below_count_stddev: float = 0.0,
  expected_clients: float | None = None,
  seed: int = 0,
) -> _processes.EstimationProcess:
  """An `EstimationProcess` tracking a quantile of per-client values (e.g. update norms).

  Each round every client reports whether its value is at most the current estimate; the
  fraction `b` of clients below it moves the estimate geometrically,
  `estimate *= exp(-learning_rate * (b - target_quantile))`, so it rises while more than the
  target fraction lies below it and falls otherwise. `report(state)` is
  `estimate * multiplier + increment`.

  The fraction follows TF Privacy's quantile queries. Without `expected_clients` it is exact, the
  below-estimate count over the clients present (`NoPrivacyQuantileEstimatorQuery`, TFF's
  `no_noise`). With `expected_clients` it is `QuantileEstimatorQuery`'s, whatever the noise:
  each client contributes `below - 1/2` (sensitivity 1/2), Gaussian noise of standard deviation
  `below_count_stddev` (none for 0) is added to the sum, and
  `b = clip(noised sum / expected_clients + 1/2, 0, 1)`: a data-independent denominator, so the
  update does not jump between a tiny and a zero noise. A round without clients leaves the
  estimate where it was.

  Args:
    initial_estimate: the first estimate, > 0.
    target_quantile: in (0, 1).
    learning_rate: > 0.
    multiplier: scales the reported value (TFF's `multiplier`), > 0.
    increment: added to the reported value (TFF's `increment`), >= 0.
    below_count_stddev: noise on the below-estimate count; 0 for no noise. Needs
      `expected_clients`.
    expected_clients: the denominator of the fraction (the expected clients per round); None
      for the exact fraction.
    seed: seeds the noise (its key is `fold_in(PRNGKey(seed), 1)`, a stream apart from the DP
      value noise of the same seed).
  """
  _check_positive(
    initial_estimate=initial_estimate, learning_rate=learning_rate, multiplier=multiplier
  )
  if not (isinstance(target_quantile, int | float) and 0 < target_quantile < 1):
    raise ValueError(f'target_quantile must be in (0, 1); got {target_quantile!r}')
  if not (math.isfinite(increment) and increment >= 0):
    raise ValueError(f'increment must be a finite number >= 0; got {increment!r}')
  if not (math.isfinite(below_count_stddev) and below_count_stddev >= 0):
    raise ValueError(f'below_count_stddev must be a finite number >= 0; got {below_count_stddev!r}')
  exact = expected_clients is None
  if exact and below_count_stddev > 0:
    raise ValueError('a noised quantile estimate needs expected_clients (its denominator)')
  if not exact:
    _check_positive(expected_clients=expected_clients)
  seed = check_seed(seed)

  def initialize():
    return QuantileEstimatorState(jnp.float32(initial_estimate), noise_key(seed, COUNT_STREAM))

  def report(state):
    return state.estimate * multiplier + increment

  def client_part(state, value):
    below = (value <= state.estimate).astype(jnp.float32)
    return below - 0.5, jnp.float32(1.0)

  def server_part(state, total):
    centered_below, count = total
    key, next_key = jax.random.split(state.rng)
    if exact:  # TF Privacy's NoPrivacyQuantileEstimatorQuery: over the clients present
      fraction = centered_below / jnp.maximum(count, 1.0) + 0.5
    else:  # its QuantileEstimatorQuery: over the expected clients, whatever the noise
      if below_count_stddev > 0:
        centered_below = centered_below + below_count_stddev * jax.random.normal(
          key, (), jnp.float32
        )
      fraction = centered_below / expected_clients + 0.5
    fraction = jnp.clip(fraction, 0.0, 1.0)
    estimate = state.estimate * jnp.exp(-learning_rate * (fraction - target_quantile))
    # An empty round (no client) leaves the estimate where it was.
    estimate = jnp.where(count > 0, estimate, state.estimate).astype(jnp.float32)
    return QuantileEstimatorState(estimate, next_key)

  return _processes.EstimationProcess(
    initialize, report=report, client_part=client_part, server_part=server_part
  )


def constant_estimate(value: float) -> _processes.EstimationProcess:
  """An `EstimationProcess` that always reports `value` (a fixed norm)."""

  def client_part(state, norm):
    del norm
    return state

  return _processes.EstimationProcess(
    lambda: (),
    report=lambda state: jnp.float32(value),
    client_part=client_part,
    server_part=lambda state, total: state,
  )


class PrivateQuantileEstimationProcess:
  """TFF's name for the quantile estimator: `.no_noise(...)` and `.gaussian(...)`."""

  @staticmethod
  def no_noise(
    initial_estimate: float,
    target_quantile: float,
    learning_rate: float,
    multiplier: float = 1.0,
    increment: float = 0.0,
  ) -> _processes.EstimationProcess:
    """The estimator without noise (see `build_quantile_estimator`)."""
    return build_quantile_estimator(
      initial_estimate, target_quantile, learning_rate, multiplier=multiplier, increment=increment
    )

  @staticmethod
  def gaussian(
    initial_estimate: float,
    target_quantile: float,
    learning_rate: float,
    noise_stddev: float,
    expected_clients: float,
    seed: int = 0,
  ) -> _processes.EstimationProcess:
    """The estimator with a Gaussian-noised below-estimate count."""
    return build_quantile_estimator(
      initial_estimate,
      target_quantile,
      learning_rate,
      below_count_stddev=noise_stddev,
      expected_clients=expected_clients,
      seed=seed,
    )
