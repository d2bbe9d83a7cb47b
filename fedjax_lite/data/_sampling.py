"""Cohort sampling: the clients of round r are a pure function of (seed, r)."""

from __future__ import annotations

import functools

import numpy as np

# The third word of the seed of the min-separation groups: a stream no round's `[seed, round]`
# draw shares.
_GROUPS_STREAM = 0x6D696E73


@functools.lru_cache(maxsize=8)
def _groups(num_clients: int, min_separation: int, seed: int) -> tuple[np.ndarray, ...]:
  """The clients split by `seed` into `min_separation` groups of near-equal size (sorted)."""
  order = np.random.default_rng([seed, min_separation, _GROUPS_STREAM]).permutation(num_clients)
  return tuple(np.sort(g) for g in np.array_split(order, min_separation))


def min_separation_groups(num_clients: int, min_separation: int, seed: int = 0) -> list[np.ndarray]:
  """The groups `sample_cohort(..., min_separation=b)` draws from: round r's cohort comes from
  group `r mod b`. Returns `b` sorted int64 arrays of client indices, sizes differing by <= 1."""
  return [g.copy() for g in _groups(int(num_clients), int(min_separation), int(seed))]


def sample_cohort(
  num_clients: int,
  cohort_size: int,
  round_num: int,
  seed: int = 0,
  client_sizes: np.ndarray | None = None,
  *,
  min_separation: int = 1,
) -> np.ndarray:
  """Indices of the clients of one round, sampled without replacement.

  The draw depends only on `(seed, round_num)`, so a run resumed at round r samples the same
  cohorts as an uninterrupted one.

  With `min_separation=b > 1` (the cyclic, "balls-in-bins" schedule of DP-FTRL with BLT and
  banded matrix mechanisms): the clients are split by `seed` into `b` groups
  (`min_separation_groups`) and round r samples its cohort from group `r mod b`, so a client
  joins at most once in any `b` consecutive rounds and at most `ceil(rounds / b)` times. Account
  for it with `fl.aggregators.DPFTRLAccountant(..., min_separation=b)`. `b = 1` is the plain draw
  from everyone.

  Args:
    num_clients: population size.
    cohort_size: clients a round (<= num_clients; <= the smallest group with `min_separation`).
    round_num: the round (>= 0).
    seed: the run's seed.
    client_sizes: optional `[num_clients]` examples per client; when given, clients are drawn
      with probability proportional to their size (clients with no example are never drawn).
      Only with `min_separation=1`: DP-FTRL's replace-one analysis assumes the schedule depends
      on the seed and the client indices only, never on a client's data.
    min_separation: b >= 1 rounds between two participations of one client.

  Raises:
    ValueError: a bad size, round or separation, a cohort larger than the population (or than
      the smallest min-separation group), or `client_sizes` with `min_separation > 1`.

  Returns:
    `[cohort_size]` int64 client indices.
  """
  for name, value, low in [
    ('num_clients', num_clients, 1),
    ('cohort_size', cohort_size, 1),
    ('min_separation', min_separation, 1),
  ]:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
      raise ValueError(f'{name} must be an int >= {low}; got {value!r}')
  if cohort_size > num_clients:
    raise ValueError(f'cohort_size={cohort_size} exceeds num_clients={num_clients}')
  if not isinstance(round_num, int | np.integer) or round_num < 0:
    raise ValueError(f'round_num must be an int >= 0; got {round_num!r}')
  sizes = None
  if client_sizes is not None:
    sizes = np.asarray(client_sizes, np.float64)
    if sizes.shape != (num_clients,) or (sizes < 0).any():
      raise ValueError(
        f'client_sizes must be [num_clients]=[{num_clients}] non-negative; got shape {sizes.shape}'
      )
  if min_separation > 1 and client_sizes is not None:
    raise ValueError(
      f'client_sizes must be None with min_separation={min_separation} > 1; got an array: a '
      "draw weighted by client data makes the schedule depend on that data, and DP-FTRL's "
      'replace-one analysis (DPFTRLAccountant) assumes it depends on the seed and the client '
      'indices only. Tip: drop client_sizes (a uniform draw within each group).'
    )
  if min_separation == 1:
    p = None
    if sizes is not None:
      if np.count_nonzero(sizes) < cohort_size:
        raise ValueError(
          f'only {np.count_nonzero(sizes)} clients have examples; cannot sample {cohort_size}'
        )
      p = sizes / sizes.sum()
    rng = np.random.default_rng([seed, round_num])
    return rng.choice(num_clients, cohort_size, replace=False, p=p)
  if min_separation > num_clients:
    raise ValueError(
      f'min_separation={min_separation} exceeds num_clients={num_clients}: some of its groups '
      'would be empty'
    )
  groups = _groups(int(num_clients), int(min_separation), int(seed))
  smallest = min(len(g) for g in groups)
  if cohort_size > smallest:
    raise ValueError(
      f'cohort_size={cohort_size} exceeds the smallest of the min_separation={min_separation} '
      f'groups of num_clients={num_clients} clients ({smallest} clients): round r draws its '
      f'cohort from group r mod {min_separation}. Tip: cohort_size <= num_clients // '
      f'min_separation = {num_clients // min_separation}, or lower min_separation.'
    )
  group = groups[int(round_num) % min_separation]
  rng = np.random.default_rng([seed, round_num])
  return group[rng.choice(len(group), cohort_size, replace=False)]
