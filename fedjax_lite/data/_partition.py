"""Partitioners: a centralized labelled dataset split into a population of clients."""

from __future__ import annotations

from typing import Any

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


def _check_count(name: str, value: Any, low: int = 1) -> None:
  if not isinstance(value, int | np.integer) or value < low:
    raise ValueError(f'{name} must be an int >= {low}; got {value!r}')


def iid_partition(num_examples: int, num_clients: int, seed: int = 0) -> list[np.ndarray]:
  """Shuffles `range(num_examples)` and deals it into `num_clients` near-equal parts."""
  _check_count('num_clients', num_clients)
  _check_count('num_examples', num_examples, low=num_clients)
  order = np.random.default_rng(seed).permutation(num_examples)
  return [np.sort(part) for part in np.array_split(order, num_clients)]


def label_shards_partition(
  labels: np.ndarray, num_clients: int, shards_per_client: int = 2, seed: int = 0
) -> list[np.ndarray]:
  """McMahan et al.'s pathological non-IID split: sort by label, cut into equal shards, give
  each client `shards_per_client` random shards (so each sees about that many classes)."""
  labels = np.asarray(labels)
  _check_count('num_clients', num_clients)
  _check_count('shards_per_client', shards_per_client)
  num_shards = num_clients * shards_per_client
  if num_shards > len(labels):
    raise ValueError(f'{num_shards} shards need at least {num_shards} examples; got {len(labels)}')
  rng = np.random.default_rng(seed)
  by_label = np.argsort(labels, kind='stable')
  shards = np.array_split(by_label, num_shards)
  dealt = rng.permutation(num_shards).reshape(num_clients, shards_per_client)
  return [np.sort(np.concatenate([shards[s] for s in row])) for row in dealt]


def power_law_partition(
  num_examples: int, num_clients: int, exponent: float = 1.5, min_size: int = 1, seed: int = 0
) -> list[np.ndarray]:
  """Size skew: client sizes proportional to draws from a Pareto (power-law) distribution
  with tail `exponent`, each at least `min_size`; examples dealt at random."""
  _check_count('num_clients', num_clients)
  _check_count('min_size', min_size)
  if not exponent > 0:
    raise ValueError(f'exponent must be > 0; got {exponent!r}')
  if num_clients * min_size > num_examples:
    raise ValueError(
      f'{num_examples} examples cannot give {num_clients} clients {min_size} examples each'
    )
  rng = np.random.default_rng(seed)
  share = rng.pareto(exponent, num_clients) + 1.0
  spare = num_examples - num_clients * min_size
  extra = np.floor(share / share.sum() * spare).astype(np.int64)
  extra[np.argsort(-share)[: spare - extra.sum()]] += 1  # hand out the rounding remainder
  sizes = min_size + extra
  order = rng.permutation(num_examples)
  return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def natural_partition(keys: np.ndarray) -> dict[Any, np.ndarray]:
  """Groups example indices by a natural key (e.g. a user id column), in first-seen order."""
  keys = np.asarray(keys)
  if keys.ndim != 1:
    raise ValueError(f'keys must be 1-D; got shape {keys.shape}')
  unique, first_seen, inverse = np.unique(keys, return_index=True, return_inverse=True)
  # One stable sort groups every key's indices (ascending) in O(n log n).
  order = np.argsort(inverse.reshape(-1), kind='stable')
  groups = np.split(order, np.cumsum(np.bincount(inverse.reshape(-1)))[:-1])
  return {unique[rank].item(): groups[rank] for rank in np.argsort(first_seen, kind='stable')}
