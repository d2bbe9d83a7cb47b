"""Privacy accounting of DP-FedAvg rounds with `dp-accounting` (the library TFF and TF Privacy use):
ε at a given δ after r rounds of the subsampled Gaussian mechanism.

dp-accounting measures a Gaussian mechanism by its noise multiplier: the noise's standard
deviation over the L2 sensitivity of the summed value *under the neighbouring relation analysed*.
Each client's update is clipped to `clip`, so adding or removing a client moves the clipped sum by
at most `clip` (sensitivity `clip`), while replacing one client by another moves it by up to
`2 · clip` (one clipped update leaves, an opposite one arrives). A noise of standard deviation
`z · clip` is therefore a multiplier of `z` under add/remove and `z / 2` under replace-one.
"""

from __future__ import annotations

import functools
import math

import dp_accounting
from dp_accounting import pld, rdp

SAMPLINGS = ('poisson', 'fixed_size')
ACCOUNTANTS = ('rdp', 'pld')


class PrivacyAccountant:
  """ε of `rounds` rounds of DP-FedAvg, each a Gaussian mechanism on a sampled cohort.

  Sampling assumptions, stated in `assumption`:
    `poisson`: each client joins a round independently with probability `clients_per_round /
      population` (the assumption of McMahan et al. 2018 and of TFF's tutorials); neighbouring
      populations differ by adding or removing one client.
    `fixed_size`: exactly `clients_per_round` clients drawn without replacement, as
      `fl.data.sample_cohort` draws them; neighbouring populations differ by replacing one
      client. Only the RDP accountant supports it.
  The noise multiplier is the ratio of the noise's standard deviation to the clip (for
  `gaussian_adaptive`, the total one: the split between value and count keeps it). Under
  replace-one neighbours the sensitivity of the clipped sum is twice the clip, so dp-accounting is
  handed `noise_multiplier / 2` there (see the module docstring); the value counts in the count
  query of an adaptive clip scale the same way (sensitivity ½ per client, 1 for a replacement).

  Args:
    noise_multiplier: > 0.
    clients_per_round: the cohort size, 1..population.
    population: the number of clients sampled from.
    target_delta: δ in (0, 1), e.g. below 1 / population.
    sampling: `poisson` or `fixed_size`.
    accountant: `rdp` (Rényi DP, Mironov 2017) or `pld` (privacy loss distributions, tighter).
  """

  def __init__(
    self,
    noise_multiplier: float,
    clients_per_round: int,
    population: int,
    target_delta: float,
    *,
    sampling: str = 'poisson',
    accountant: str = 'rdp',
  ):
    if not (isinstance(noise_multiplier, int | float) and noise_multiplier > 0):
      raise ValueError(f'noise_multiplier must be > 0 to account for; got {noise_multiplier!r}')
    if not (isinstance(population, int) and population >= 1):
      raise ValueError(f'population must be an int >= 1; got {population!r}')
    if not (isinstance(clients_per_round, int) and 1 <= clients_per_round <= population):
      raise ValueError(
        f'clients_per_round must be an int in [1, population={population}]; got '
        f'{clients_per_round!r}'
      )
    if not (isinstance(target_delta, int | float) and 0 < target_delta < 1):
      raise ValueError(f'target_delta must be in (0, 1); got {target_delta!r}')
    if sampling not in SAMPLINGS:
      raise ValueError(f'sampling must be one of {SAMPLINGS}; got {sampling!r}')
    if accountant not in ACCOUNTANTS:
      raise ValueError(f'accountant must be one of {ACCOUNTANTS}; got {accountant!r}')
    if sampling == 'fixed_size' and accountant != 'rdp':
      raise ValueError("sampling='fixed_size' is accounted for by the 'rdp' accountant only")
    self.noise_multiplier = float(noise_multiplier)
    self.clients_per_round = clients_per_round
    self.population = population
    self.target_delta = float(target_delta)
    self.sampling = sampling
    self.accountant = accountant
    if sampling == 'poisson':
      gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
      self._event = dp_accounting.PoissonSampledDpEvent(clients_per_round / population, gaussian)
    else:  # replace-one: the clipped sum's sensitivity is 2 · clip
      gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier / 2)
      self._event = dp_accounting.SampledWithoutReplacementDpEvent(
        population, clients_per_round, gaussian
      )

  @property
  def assumption(self) -> str:
    """The sampling assumption the numbers hold under, in words."""
    if self.sampling == 'poisson':
      return (
        f'Poisson sampling (rate {self.clients_per_round}/{self.population}), add/remove-one '
        f'neighbours, {self.accountant.upper()} accountant'
      )
    return (
      f'fixed-size sampling without replacement ({self.clients_per_round} of '
      f'{self.population}), replace-one neighbours (sensitivity 2 x clip), RDP accountant'
    )

  @functools.cache  # noqa: B019 (a few floats per accountant)
  def epsilon(self, rounds: int) -> float:
    """ε at `target_delta` after `rounds` rounds (0 for no round)."""
    if rounds <= 0:
      return 0.0
    if self.accountant == 'rdp':
      relation = (
        dp_accounting.NeighboringRelation.REPLACE_ONE
        if self.sampling == 'fixed_size'
        else dp_accounting.NeighboringRelation.ADD_OR_REMOVE_ONE
      )
      accountant = rdp.RdpAccountant(neighboring_relation=relation)
    else:
      accountant = pld.PLDAccountant()
    accountant.compose(self._event, rounds)
    eps = accountant.get_epsilon(self.target_delta)
    return float(eps) if math.isfinite(eps) else math.inf
