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

dp-accounting then measures one Gaussian mechanism of noise multiplier
`noise_multiplier / (f · sensitivity)`, f = 2 or 1: `pld` by its exact privacy profile
(`GaussianPrivacyLoss`, ε bisected; milliseconds, where `PLDAccountant` takes seconds for the
small multipliers of long runs), `rdp` by `RdpAccountant`.

The tree's sensitivity is jax-privacy's min-separation upper bound (computed in numpy,
`CorrelatedNoiseMechanism.sensitivity`): milliseconds per round up to a few hundred rounds, so
`epsilon(r)` evaluates it at r itself while its dynamic program stays below `_EXACT_TREE_COST`
cell updates. Beyond that, round r is accounted at r' = the next power of two >= r (capped at
`total_rounds`): the bound is non-decreasing in r (more rounds only add tree nodes, i.e. rows of
`C` with non-negative entries, and allow more participation patterns), so this over-reports ε,
never under-reports it, and a run computes at most log2(total_rounds) such bounds.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
import numpy as np
from dp_accounting import pld, rdp

from fedjax_lite.aggregators import _dp_ftrl

# Above this many dynamic-program cell updates (k_r · r · (r + b), twice) the tree's bound is
# taken at the next power of two: ~0.03 s of numpy (exact up to r = 128 at b = 1, r = 219 at
# b = 5).
_EXACT_TREE_COST = 2**22
NEIGHBORING = {'replace_one': 2.0, 'zero_out': 1.0}
ACCOUNTANTS = ('pld', 'rdp')


class DPFTRLAccountant:
  """ε of the first rounds of DP-FTRL with `mechanism`, its noise and participation schedule.

  Example:
    >>> acc = fl.aggregators.DPFTRLAccountant(
    ...     'blt', 1.5, 1e-6, total_rounds=100, min_separation=10)
    >>> acc.epsilon(50), acc.epsilon(100)

  A schedule the analysis does not cover is refused with a ValueError, never under-reported:
  rounds beyond `total_rounds`, a participation cap below `ceil(total_rounds / min_separation)`,
  or a built mechanism asked about another min separation, number of rounds, participations or
  bands than it was built (optimized) for.

  Passing the factory's own mechanism (`DPFTRLAccountant(factory.mechanism, ...)`) is the safest:
  it is the very `C` the noise streams. By name, every argument that shaped the factory's
  mechanism (`total_rounds`, `min_separation`, `max_participations`, `bands`) must be repeated,
  or another `C` is analysed.

  Args:
    mechanism: `tree`, `banded`, `blt` (built as `dp_ftrl_aggregator` builds it: the same
      cached strategy) or a `build_dp_ftrl_mechanism` result (the one the factory holds).
    noise_multiplier: > 0, as given to `dp_ftrl_aggregator`.
    target_delta: δ in (0, 1), e.g. below 1 / population.
    total_rounds: rounds of the run (required with a mechanism name).
    min_separation: b of the schedule; default 1 with a name, the mechanism's with a mechanism.
    max_participations: k, `ceil(total_rounds / b)` (the default; a smaller k is refused).
    bands: `banded`'s bands or `blt`'s most buffers, as given to `dp_ftrl_aggregator`
      (default theirs: b, 10); with a built mechanism, its own or None.
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
    bands: int | None = None,
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
    built = _dp_ftrl.resolve_mechanism(
      mechanism,
      total_rounds=total_rounds,
      min_separation=min_separation,
      max_participations=max_participations,
      bands=bands,
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
    rounds = _accounted_rounds(self.mechanism, rounds)
    return self.noise_multiplier / (factor * _sensitivity(self.mechanism, rounds))

  @functools.cache  # noqa: B019 (a few floats per accountant)
  def epsilon(self, rounds: int) -> float:
    """ε at `target_delta` after `rounds` rounds (0 for none); rounds beyond the mechanism's
    `total_rounds` raise ValueError."""
    if isinstance(rounds, int) and rounds <= 0:
      return 0.0
    multiplier = self.effective_noise_multiplier(rounds)
    if self.accountant == 'pld':
      return _gaussian_epsilon(multiplier, self.target_delta)
    accountant = rdp.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(multiplier))
    eps = accountant.get_epsilon(self.target_delta)
    return float(eps) if math.isfinite(eps) else math.inf


def _accounted_rounds(mechanism: _dp_ftrl.CorrelatedNoiseMechanism, rounds: int) -> int:
  """The rounds whose sensitivity bounds round `rounds`'s: itself, or for a tree whose bound
  would cost more than `_EXACT_TREE_COST` the next power of two (capped at `total_rounds`; the
  bound is non-decreasing in the rounds, see the module docstring). Invalid rounds pass through
  to `mechanism.sensitivity`, which refuses them."""
  ok = isinstance(rounds, int | np.integer) and not isinstance(rounds, bool)
  if mechanism.name != 'tree' or not ok or not 1 <= rounds <= mechanism.total_rounds:
    return rounds
  rounds = int(rounds)
  b = mechanism.min_separation
  k = _dp_ftrl.max_participations_for(rounds, b, mechanism.max_participations)
  if 2 * k * rounds * (rounds + b) <= _EXACT_TREE_COST:
    return rounds
  return min(1 << (rounds - 1).bit_length(), mechanism.total_rounds)


@functools.lru_cache(maxsize=4096)
def _gaussian_epsilon(noise_multiplier: float, target_delta: float) -> float:
  """The smallest ε (to 1e-12 relative, rounded up) with δ(ε) <= `target_delta` for one Gaussian
  mechanism of this noise multiplier: dp-accounting's exact hockey-stick divergence
  (`GaussianPrivacyLoss.get_delta_for_epsilon`, Balle & Wang 2018), the PLD of one Gaussian
  without discretization, bisected. `pld.PLDAccountant` gives the same (its discretization is
  pessimistic, ~1e-7 above) but takes 0.1-15 s for the small multipliers of long runs."""
  loss = pld.privacy_loss_mechanism.GaussianPrivacyLoss(noise_multiplier, sensitivity=1.0)
  if loss.get_delta_for_epsilon(0.0) <= target_delta:
    return 0.0
  low, high = 0.0, 1.0
  while loss.get_delta_for_epsilon(high) > target_delta:
    low, high = high, 2.0 * high
    if high > 1e9:
      return math.inf
  while high - low > 1e-12 * high:
    middle = 0.5 * (low + high)
    if loss.get_delta_for_epsilon(middle) > target_delta:
      low = middle
    else:
      high = middle
  return float(high)


@functools.cache
def _sensitivity(mechanism: _dp_ftrl.CorrelatedNoiseMechanism, rounds: int) -> float:
  """`mechanism.sensitivity(rounds)`, cached per mechanism and rounds."""
  return mechanism.sensitivity(rounds)
