"""Cohort sampling: the clients of round r are a pure function of (seed, r)."""

from __future__ import annotations

import numpy as np


def sample_cohort(
  num_clients: int,
  cohort_size: int,
  round_num: int,
  seed: int = 0,
  client_sizes: np.ndarray | None = None,
) -> np.ndarray:
  """Indices of the clients of one round, sampled without replacement.

  The draw depends only on `(seed, round_num)`, so a run resumed at round r samples the same
  cohorts as an uninterrupted one.

  Args:
    num_clients: population size.
    cohort_size: clients a round (<= num_clients).
    round_num: the round (>= 0).
    seed: the run's seed.
    client_sizes: optional `[num_clients]` examples per client; when given, clients are drawn
      with probability proportional to their size (clients with no example are never drawn).

  Returns:
    `[cohort_size]` int64 client indices.
  """
  for name, value, low in [('num_clients', num_clients, 1), ('cohort_size', cohort_size, 1)]:
    if not isinstance(value, int | np.integer) or value < low:
      raise ValueError(f'{name} must be an int >= {low}; got {value!r}')
  if cohort_size > num_clients:
    raise ValueError(f'cohort_size={cohort_size} exceeds num_clients={num_clients}')
  if not isinstance(round_num, int | np.integer) or round_num < 0:
    raise ValueError(f'round_num must be an int >= 0; got {round_num!r}')
  p = None
  if client_sizes is not None:
    sizes = np.asarray(client_sizes, np.float64)
    if sizes.shape != (num_clients,) or (sizes < 0).any():
      raise ValueError(
        f'client_sizes must be [num_clients]=[{num_clients}] non-negative; got shape {sizes.shape}'
      )
    if np.count_nonzero(sizes) < cohort_size:
      raise ValueError(
        f'only {np.count_nonzero(sizes)} clients have examples; cannot sample {cohort_size}'
      )
    p = sizes / sizes.sum()
  rng = np.random.default_rng([seed, round_num])
  return rng.choice(num_clients, cohort_size, replace=False, p=p)
