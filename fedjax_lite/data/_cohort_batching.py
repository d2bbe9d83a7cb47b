"""Cohort batching: a round's clients read from a `FederatedData`, shuffled, padded and masked
into one `ClientBatches`, the step axis bucketed so the compiled round sees few shapes."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from fedjax_lite.data import _client_batches
from fedjax_lite.data._federated_data import FederatedData


def client_key(client_id: Any) -> int:
  """A stable non-negative int for a client id: the id itself for ints, a hash for str/bytes.

  Seeding a client's shuffles by `(seed, round_num, client_key(id))` gives it the same order
  whichever cohort position it lands in, and in every process (Python's `hash` is salted).
  """
  if isinstance(client_id, int | np.integer) and not isinstance(client_id, bool):
    return int(client_id) % 2**63
  if isinstance(client_id, str):
    client_id = client_id.encode()
  if isinstance(client_id, bytes):
    return int.from_bytes(hashlib.blake2b(client_id, digest_size=8).digest(), 'little') >> 1
  raise TypeError(f'client ids must be int, str or bytes; got {type(client_id).__name__}')


def step_buckets(max_steps: int, num_buckets: int = 4) -> tuple[int, ...]:
  """Step counts `ceil(max_steps / 2**k)` for `k < num_buckets`, ascending.

  With these as `batch_cohort(..., buckets=)` a round compiles at most `num_buckets` times and
  a cohort is padded to at most twice its longest client (or to the smallest bucket).
  """
  for name, value in [('max_steps', max_steps), ('num_buckets', num_buckets)]:
    if not isinstance(value, int | np.integer) or value < 1:
      raise ValueError(f'{name} must be an int >= 1; got {value!r}')
  return tuple(sorted({-(-int(max_steps) // 2**k) for k in range(num_buckets)}))


def padding_fraction(client_batches: _client_batches.ClientBatches) -> float:
  """The fraction of example slots of `client_batches` that are padding (mask 0)."""
  return 1.0 - float(np.mean(client_batches.mask))


def check_labels(labels: np.ndarray, num_classes: int, where: str) -> None:
  """Raises unless every integer label is a class in `[0, num_classes)`.

  A label outside the model's classes gives NaN or silently wrong losses in the compiled round,
  where nothing can raise, so labels are checked where the data enters.

  Args:
    labels: integer labels, any shape.
    num_classes: the model's number of classes.
    where: what holds the labels, for the message (e.g. "client 'f0012_34'").

  Raises:
    ValueError: naming `where`, the first bad label and the expected range.
  """
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    raise TypeError(f'labels of {where} must be integers (class indices); got {labels.dtype}')
  bad = (labels < 0) | (labels >= num_classes)
  if bad.any():
    raise ValueError(
      f'{where} has label {labels[bad].flat[0]} ({int(bad.sum())} such labels); labels must be '
      f'class indices in [0, {num_classes})'
    )


def batch_cohort(
  data: FederatedData,
  client_ids: Sequence[Any],
  *,
  batch_size: int,
  num_epochs: int = 1,
  max_steps: int | None = None,
  round_num: int = 0,
  seed: int = 0,
  buckets: Sequence[int] | None = None,
  shuffle: bool = True,
  num_classes: int | None = None,
) -> _client_batches.ClientBatches:
  """The `ClientBatches` of one round's cohort, in `client_ids` order.

  Each client's examples are shuffled per epoch with a seed of `(seed, round_num,
  client_key(id))`, so a resumed run batches every round as the uninterrupted run did. The
  per-batch hooks of `data` (`FederatedData.preprocess_batch`) are applied to the whole cohort.

  Args:
    data: the population.
    client_ids: the cohort (e.g. `[data.client_ids[i] for i in sample_cohort(...)]`), each
      client once (a repeated id raises a ValueError naming it).
    batch_size: examples per step.
    num_epochs: passes over each client's data.
    max_steps: optional cap on steps per client.
    round_num: the round, mixed into the shuffle seeds.
    seed: the run's seed.
    buckets: ascending step counts (e.g. `step_buckets(...)`); the step axis is padded to the
      smallest bucket that holds the cohort's longest client. None pads to the longest client
      exactly (a skewed population then compiles once per distinct length).
    shuffle: whether to shuffle within each epoch.
    num_classes: when given, every client's `'y'` must hold class indices in
      `[0, num_classes)` (`check_labels`); a client with another label is named in the error.

  Returns:
    `ClientBatches` with leaves `[len(client_ids), steps, batch_size, ...]`.
  """
  if not len(client_ids):
    raise ValueError('client_ids is empty; expected at least one client')
  _client_batches.check_unique(client_ids, 'client_ids')
  clients = data.get_clients(client_ids)
  if num_classes is not None:
    for client_id, client in zip(client_ids, clients, strict=True):
      if 'y' not in client:
        raise ValueError(
          f'num_classes checks the labels "y", but client {client_id!r} has only {sorted(client)}'
        )
      check_labels(client['y'], num_classes, f'client {client_id!r}')
  longest = max(
    _client_batches.client_steps(len(next(iter(c.values()))), num_epochs, batch_size, max_steps)
    for c in clients
  )
  num_steps = None
  if buckets is not None:
    buckets = sorted(int(b) for b in buckets)
    if not buckets or buckets[0] < 1:
      raise ValueError(f'buckets must be non-empty step counts >= 1; got {buckets}')
    if longest > buckets[-1]:
      raise ValueError(
        f'the longest client of this cohort takes {longest} steps, more than the largest '
        f'bucket ({buckets[-1]}); buckets={buckets}. Tip: build buckets from the population '
        'maximum, or set max_steps'
      )
    num_steps = next(b for b in buckets if b >= longest)
  batches = _client_batches.build_client_batches(
    clients,
    batch_size=batch_size,
    num_epochs=num_epochs,
    max_steps=max_steps,
    num_steps=num_steps,
    seed=(seed, round_num),
    client_keys=[client_key(c) for c in client_ids],
    shuffle=shuffle,
  )
  if not data._batch_preprocess:
    return batches
  # Hooks see only the real rows; padding stays zeros (masked), and its pages, never written,
  # cost no memory: host time and memory follow the real examples, not the padded shape.
  lead = batches.mask.shape
  real = batches.mask.reshape(-1) > 0
  flat = {k: v.reshape(-1, *v.shape[3:])[real] for k, v in batches.batch.items()}
  flat = data.apply_batch_preprocess(flat)
  batch = {}
  for k, v in flat.items():
    padded = _client_batches.aligned_zeros((*lead, *v.shape[1:]), v.dtype)
    padded.reshape(-1, *v.shape[1:])[real] = v
    batch[k] = padded
  return batches._replace(batch=batch)
