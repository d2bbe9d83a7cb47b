"""Stragglers: clients of a cohort that do only part of their local work (systems heterogeneity,
as the FedProx paper simulates it: Li et al., 2020, Section 5.2).

A straggler's partial work is a budget of examples in its `ClientBatches` mask: it keeps its
first examples (its first epochs, in the order it would see them) and the rest become padding,
which changes nothing. The shapes stay as they are, so rounds with other draws run the same
compiled program. Two policies, as the paper compares them: `'drop'` (FedAvg's: stragglers send
nothing, the round aggregates the others) and `'partial'` (FedProx's: their partial updates
count).
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data._client_batches import ClientBatches

POLICIES = ('drop', 'partial')
_STREAM = 0x5747  # keeps the straggler draws apart from the cohort and shuffle streams


def straggler_work(
  num_clients: int, fraction: float, num_epochs: int, *, round_num: int, seed: int = 0
) -> np.ndarray:
  """`[num_clients]` float: the share of its local work each client of round `round_num` does.

  `num_clients - round(num_clients * (1 - fraction))` clients, drawn without replacement, are
  stragglers (the FedProx code's count); the others do all their work (1.0). A straggler does
  `x / num_epochs` of it, `x` uniform in `1..num_epochs - 1` epochs (the paper's draw), or with one
  epoch a uniform share of it in (0, 1). Deterministic per `(seed, round_num)`.
  """
  if isinstance(fraction, bool) or not isinstance(fraction, int | float) or not 0 <= fraction < 1:
    raise ValueError(f'fraction must be a number in [0, 1); got {fraction!r}')
  if isinstance(num_epochs, bool) or not isinstance(num_epochs, int) or num_epochs < 1:
    raise ValueError(f'num_epochs must be an int >= 1; got {num_epochs!r}')
  rng = np.random.default_rng([seed, round_num, _STREAM])
  work = np.ones(num_clients)
  stragglers = rng.permutation(num_clients)[: num_clients - round(num_clients * (1 - fraction))]
  if num_epochs >= 2:
    work[stragglers] = rng.integers(1, num_epochs, len(stragglers)) / num_epochs
  else:
    work[stragglers] = rng.uniform(0, 1, len(stragglers))
  return work


def apply_straggler_work(
  client_batches: ClientBatches, work: np.ndarray, policy: str
) -> ClientBatches:
  """`client_batches` with client c doing `work[c]` of its examples.

  `'partial'`: client c keeps its first `ceil(work[c] * real examples)` examples (at least one),
  in step order; `'drop'`: a client with `work < 1` keeps none (it takes no part in the round).
  """
  if policy not in POLICIES:
    raise ValueError(f'policy must be one of {", ".join(POLICIES)}; got {policy!r}')
  mask = np.asarray(client_batches.mask)
  work = np.asarray(work, np.float64)
  if work.shape != mask.shape[:1]:
    raise ValueError(f'work has shape {work.shape}; expected ({mask.shape[0]},), one per client')
  real = (mask > 0).reshape(mask.shape[0], -1)
  if policy == 'drop':
    budget = np.where(work < 1, 0, real.sum(axis=1))
  else:
    budget = np.maximum(np.ceil(work * real.sum(axis=1)), np.minimum(real.sum(axis=1), 1))
  kept = real & (np.cumsum(real, axis=1) <= budget[:, None])
  return client_batches._replace(mask=(mask * kept.reshape(mask.shape)).astype(mask.dtype))
