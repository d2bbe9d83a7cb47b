"""DP-FedAvg's aggregation (McMahan et al., 2018, "Learning Differentially Private Recurrent
Language Models"): each client's update clipped to an L2 norm, the clipped updates summed, one
draw of Gaussian noise added to the sum on the server, divided by the expected number of
clients. TFF's `DifferentiallyPrivateFactory.gaussian_fixed` / `.gaussian_adaptive`."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators import _factories, _quantile, _robust
from fedjax_lite.templates import _processes


class DPState(NamedTuple):
  """State of the DP aggregation.

  Attributes:
    rng: `[2] uint32` key of this round's noise, advanced every round (reproducible, resumable);
      from the factory's `seed`.
    clip: the clip's `EstimationProcess` state (`()` for a fixed clip).
  """

  rng: jax.Array
  clip: Any


def _check(**values: float) -> None:
  for name, value in values.items():
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
      raise ValueError(f'{name} must be a finite number; got {value!r}')


class DifferentiallyPrivateFactory:
  """Unweighted DP mean: `(Σ clip(v_c) + N(0, (noise_multiplier · clip)² I)) / clients_per_round`.

  Build it with `gaussian_fixed` or `gaussian_adaptive`. Use it where an unweighted aggregator
  is expected (`build_unweighted_fed_avg(..., model_aggregator=...)`). Measurements:
  `{'dp_query_metrics': {'clip', 'clipped_count'}, 'dp': {}}`: `clip` is the clip after the
  round's update (what TFF's `derive_metrics` reports of the new query state; the round itself
  clipped at the clip before it), `clipped_count` the clients whose norm exceeded the round's
  clip. The noise is keyed from the process state, which starts from `seed`: give each run
  (each seed of a sweep) its own, or every run draws the same noise. The privacy guarantee is
  the accountant's business (ε from the noise multiplier, the sampling rate and the rounds),
  not this factory's.
  """

  def __init__(
    self,
    value_noise_multiplier: float,
    clients_per_round: float,
    clip_process: _processes.EstimationProcess,
    seed: int,
  ):
    """Use `gaussian_fixed` or `gaussian_adaptive`."""
    self._value_noise_multiplier = float(value_noise_multiplier)
    self._clients_per_round = float(clients_per_round)
    self._clip = clip_process
    self._seed = _quantile.check_seed(seed)

  @classmethod
  def gaussian_fixed(
    cls, noise_multiplier: float, clients_per_round: float, clip: float, seed: int = 0
  ) -> DifferentiallyPrivateFactory:
    """A fixed L2 clip; the noise standard deviation is `noise_multiplier * clip`; `seed`
    keys the noise."""
    _check(noise_multiplier=noise_multiplier, clients_per_round=clients_per_round, clip=clip)
    if noise_multiplier < 0:
      raise ValueError(f'noise_multiplier must be >= 0; got {noise_multiplier}')
    if clients_per_round <= 0 or clip <= 0:
      raise ValueError(
        f'clients_per_round and clip must be > 0; got {clients_per_round} and {clip}'
      )
    return cls(noise_multiplier, clients_per_round, _quantile.constant_estimate(clip), seed)

  @classmethod
  def gaussian_adaptive(
    cls,
    noise_multiplier: float,
    clients_per_round: float,
    initial_l2_norm_clip: float = 0.1,
    target_unclipped_quantile: float = 0.5,
    learning_rate: float = 0.2,
    clipped_count_stddev: float | None = None,
    seed: int = 0,
  ) -> DifferentiallyPrivateFactory:
    """A clip that tracks the `target_unclipped_quantile` of the update norms (Andrew et al.,
    2021), its below-clip count privatized with `clipped_count_stddev` (default
    `0.05 * clients_per_round`, TFF's). Part of the privacy budget goes to the count, so the
    value's noise multiplier is raised to `(z⁻² − (2σ_b)⁻²)^(-1/2)` to keep the total at `z`.
    With `noise_multiplier` 0 the default count noise is 0 too (TFF's rule); the below-clip
    fraction is over `clients_per_round` whatever the noise, as TF Privacy's quantile query
    has it. `seed` keys both noises (independent streams).
    """
    _check(noise_multiplier=noise_multiplier, clients_per_round=clients_per_round)
    if noise_multiplier < 0 or clients_per_round <= 0:
      raise ValueError(
        'noise_multiplier must be >= 0 and clients_per_round > 0; got '
        f'{noise_multiplier} and {clients_per_round}'
      )
    if clipped_count_stddev is not None:
      _check(clipped_count_stddev=clipped_count_stddev)
      if clipped_count_stddev < 0:
        raise ValueError(f'clipped_count_stddev must be >= 0; got {clipped_count_stddev}')
    if noise_multiplier > 0:  # TFF's adaptive_clip_noise_params
      if clipped_count_stddev is None:
        clipped_count_stddev = 0.05 * clients_per_round
      if not 2 * clipped_count_stddev > noise_multiplier:
        raise ValueError(
          f'clipped_count_stddev ({clipped_count_stddev}) must be more than half the '
          f'noise_multiplier ({noise_multiplier}): the count would use the whole budget. '
          'Tip: raise clients_per_round (the default clipped_count_stddev is 0.05 * '
          'clients_per_round) or clipped_count_stddev, or use gaussian_fixed (a fixed clip)'
        )
      value_noise = (noise_multiplier**-2 - (2 * clipped_count_stddev) ** -2) ** -0.5
    else:
      value_noise = 0.0
      clipped_count_stddev = clipped_count_stddev or 0.0
    clip = _quantile.build_quantile_estimator(
      initial_l2_norm_clip,
      target_unclipped_quantile,
      learning_rate,
      below_count_stddev=clipped_count_stddev,
      expected_clients=clients_per_round,
      seed=seed,
    )
    return cls(value_noise, clients_per_round, clip, seed)

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    spec = _factories.float_spec(value_spec)
    clip_process, z = self._clip, self._value_noise_multiplier
    denominator, seed = self._clients_per_round, self._seed

    def initialize():
      return DPState(_quantile.noise_key(seed, _quantile.VALUE_STREAM), clip_process.initialize())

    def client_part(state, value, client_id):
      del client_id
      limit = clip_process.report(state.clip)
      clipped, norm = _robust.clip_by_global_norm(value, limit)
      return clipped, (norm > limit).astype(jnp.int32), clip_process.client_part(state.clip, norm)

    def server_part(state, total):
      clipped_sum, clipped_count, clip_sum = total
      limit = clip_process.report(state.clip)
      key, next_key = jax.random.split(state.rng)
      leaves, treedef = jax.tree.flatten(clipped_sum)
      keys = jax.random.split(key, max(len(leaves), 1))
      noised = [
        x + (z * limit * jax.random.normal(k, x.shape, jnp.float32)).astype(x.dtype)
        for x, k in zip(leaves, keys, strict=False)
      ]
      mean = jax.tree.map(lambda x: x / denominator, jax.tree.unflatten(treedef, noised))
      new_state = DPState(next_key, clip_process.server_part(state.clip, clip_sum))
      new_limit = clip_process.report(new_state.clip)  # TFF: derive_metrics(new query state)
      measurements = {
        'dp_query_metrics': {'clip': new_limit, 'clipped_count': clipped_count},
        'dp': {},
      }
      return _processes.MeasuredProcessOutput(new_state, mean, measurements)

    return _processes.AggregationProcess(
      initialize,
      None,
      False,
      client_part=client_part,
      server_part=server_part,
      value_spec=spec,
    )
