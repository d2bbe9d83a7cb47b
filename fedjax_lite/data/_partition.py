"""Partitioners: a centralized labelled dataset split into a population of clients."""

from __future__ import annotations

import numpy as np


def dirichlet_label_partition(
  labels: np.ndarray, num_clients: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
  """Splits example indices over clients with label proportions ~ Dirichlet(alpha).

  For each class, its examples are shuffled and dealt to clients in proportions drawn from
  Dirichlet(alpha · 1); small alpha gives each client few classes (Hsu et al., 2019). Draws
  repeat until every client has at least `min_size` examples.

  Args:
    labels: `[n]` integer labels.
    num_clients: clients to create.
    alpha: concentration > 0.
    seed: seeds every draw.
    min_size: the fewest examples a client may get.

  Returns:
    `num_clients` sorted index arrays that together hold every index exactly once.
  """
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise ValueError(f'labels must be 1-D; got shape {labels.shape}')
  if not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'num_clients must be an int >= 1; got {num_clients!r}')
  if not alpha > 0:
    raise ValueError(f'alpha must be > 0; got {alpha!r}')
  if num_clients * min_size > len(labels):
    raise ValueError(
      f'{len(labels)} examples cannot give {num_clients} clients {min_size} examples each'
    )
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  for _ in range(1000):
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in classes:
      idx = rng.permutation(np.flatnonzero(labels == c))
      proportions = rng.dirichlet(np.full(num_clients, alpha))
      cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
      for client, chunk in enumerate(np.split(idx, cuts)):
        parts[client].extend(chunk.tolist())
    if min(len(p) for p in parts) >= min_size:
      return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]
  raise ValueError(
    f'no Dirichlet(alpha={alpha}) draw in 1000 gave every client {min_size} examples; '
    'raise alpha or lower num_clients'
  )
