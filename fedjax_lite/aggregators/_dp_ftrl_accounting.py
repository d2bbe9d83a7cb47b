"""Privacy accounting of DP-FTRL (`dp_ftrl_aggregator`): ε at a given δ after r rounds.

The first r rounds release a post-processing of `C_r x + Z` (`C_r`: the mechanism's strategy
matrix on those rounds; `Z`: Gaussian of standard deviation `noise_multiplier · clip`), so they
are one Gaussian mechanism, no amplification by sampling assumed (the analysis of Kairouz et al.
2021, Choquette-Choo et al. 2023, McMahan et al. 2024). Its sensitivity is `C_r`'s under the
schedule — a client in at most `k_r = min(k, ceil(r / b))` rounds, any two at least `b` apart —
computed by jax-privacy (`CorrelatedNoiseMechanism.sensitivity`), times the change one client
makes to a round's clipped sum:

  `replace_one` (default): one client's data replaced by another's, the schedule unchanged (it
    depends on the seed and the client's index only): up to `2 · clip` per round it joins, as
    `PrivacyAccountant(sampling='fixed_size')` assumes for DP-FedAvg's cohorts.
  `zero_out`: one client's contributions replaced by zeros (the DP-FTRL papers' relation; an
    add/remove-one relation that keeps the schedule): up to `clip` per round.

dp-accounting then measures `GaussianDpEvent(noise_multiplier / (f · sensitivity))`, f = 2 or 1.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting import pld, rdp

from fedjax_lite.aggregators import _dp_ftrl

NEIGHBORING = {'replace_one': 2.0, 'zero_out': 1.0}
ACCOUNTANTS = ('pld', 'rdp')


class DPFTRLAccountant:
  """ε of the first rounds of DP-FTRL with `mechanism`, its noise and participation schedule.

  Example:
    >>> acc = fl.aggregators.DPFTRLAccountant(
    ...     'blt', 1.5, 1e-6, total_rounds=100, min_separation=10)
    >>> acc.epsilon(50), acc.epsilon(100)

  A schedule the analysis does not cover is refused with a ValueError, never under-reported:
  rounds beyond `total_rounds`, or a built mechanism asked about another min separation,
  number of rounds or participations than it was built (optimized) for.

  Args:
    mechanism: `tree`, `banded`, `blt` (built as `dp_ftrl_aggregator` builds it: the same
      cached strategy) or a `build_dp_ftrl_mechanism` result (the one the factory holds).
    noise_multiplier: > 0, as given to `dp_ftrl_aggregator`.
    target_delta: δ in (0, 1), e.g. below 1 / population.
    total_rounds: rounds of the run (required with a mechanism name).
    min_separation: b of the schedule; default 1 with a name, the mechanism's with a mechanism.
    max_participations: k, default `ceil(total_rounds / b)`.
    neighboring: `replace_one` (sensitivity 2 x clip per round) or `zero_out` (1 x clip).
    accountant: `pld` (privacy loss distributions, tight for a Gaussian) or `rdp`.
  """

  def __init__(
    self,
    mechanism: str | _dp_ftrl.CorrelatedNoiseMechanism,
    noise_multiplier: float,
    target_delta: float,
    *,
    total_rounds: int | None = None,
    min_separation: int | None = None,
    max_participations: int | None = None,
    neighboring: str = 'replace_one',
    accountant: str = 'pld',
  ):
    ok = isinstance(noise_multiplier, int | float) and not isinstance(noise_multiplier, bool)
    if not (ok and math.isfinite(noise_multiplier) and noise_multiplier > 0):
      raise ValueError(f'noise_multiplier must be > 0 to account for; got {noise_multiplier!r}')
    if not (isinstance(target_delta, int | float) and 0 < target_delta < 1):
      raise ValueError(f'target_delta must be in (0, 1); got {target_delta!r}')
    if neighboring not in NEIGHBORING:
      raise ValueError(f'neighboring must be one of {tuple(NEIGHBORING)}; got {neighboring!r}')
    if accountant not in ACCOUNTANTS:
      raise ValueError(f'accountant must be one of {ACCOUNTANTS}; got {accountant!r}')
    if isinstance(mechanism, _dp_ftrl.CorrelatedNoiseMechanism):
      built = mechanism
      asked = {
        'total_rounds': (total_rounds, built.total_rounds),
        'min_separation': (min_separation, built.min_separation),
        'max_participations': (max_participations, built.max_participations),
      }
      for name, (value, own) in asked.items():
        if value is not None and value != own:
          raise ValueError(
            f'{name}={value} does not match the {built.name} mechanism, built (optimized and '
            f'analysed) for {name}={own}: its guarantee does not cover this schedule. Tip: '
            f'build the mechanism and the aggregator for {name}={value}.'
          )
    else:
      if total_rounds is None:
        raise ValueError(f'total_rounds is required with mechanism={mechanism!r}; got None')
      built = _dp_ftrl.build_dp_ftrl_mechanism(
        mechanism,
        total_rounds,
        min_separation=1 if min_separation is None else min_separation,
        max_participations=max_participations,
      )
    self.mechanism = built
    self.noise_multiplier = float(noise_multiplier)
    self.target_delta = float(target_delta)
    self.neighboring = neighboring
    self.accountant = accountant

  @property
  def assumption(self) -> str:
    """The schedule and relation the numbers hold under, in words."""
    m = self.mechanism
    change = '2 x clip' if self.neighboring == 'replace_one' else 'clip'
    return (
      f'DP-FTRL {m.name} mechanism for {m.total_rounds} rounds, a client in at most '
      f'{m.max_participations} rounds at least {m.min_separation} apart, no sampling '
      f'amplification, {self.neighboring.replace("_", "-")} neighbours ({change} per round), '
      f'{self.accountant.upper()} accountant'
    )

  def effective_noise_multiplier(self, rounds: int) -> float:
    """The Gaussian mechanism's noise over its sensitivity after `rounds` rounds."""
    factor = NEIGHBORING[self.neighboring]
    return self.noise_multiplier / (factor * _sensitivity(self.mechanism, rounds))

  @functools.cache  # noqa: B019 (a few floats per accountant)
  def epsilon(self, rounds: int) -> float:
    """ε at `target_delta` after `rounds` rounds (0 for none); rounds beyond the mechanism's
    `total_rounds` raise ValueError."""
    if isinstance(rounds, int) and rounds <= 0:
      return 0.0
    event = dp_accounting.GaussianDpEvent(self.effective_noise_multiplier(rounds))
    accountant = rdp.RdpAccountant() if self.accountant == 'rdp' else pld.PLDAccountant()
    accountant.compose(event)
    eps = accountant.get_epsilon(self.target_delta)
    return float(eps) if math.isfinite(eps) else math.inf


@functools.cache
def _sensitivity(mechanism: _dp_ftrl.CorrelatedNoiseMechanism, rounds: int) -> float:
  """`mechanism.sensitivity(rounds)`, cached (the tree's takes a second or so)."""
  return mechanism.sensitivity(rounds)
