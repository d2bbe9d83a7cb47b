"""`ClientBatches`: one round's client data as padded, masked arrays; a simple host-side builder."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import numpy as np


class ClientBatches(NamedTuple):
  """The data of a cohort for one round, `{D*}@CLIENTS` in TFF's notation.

  Attributes:
    batch: pytree (e.g. `{'x': ..., 'y': ...}`) whose leaves are `[clients, steps, batch_size,
      ...]`.
    mask: `[clients, steps, batch_size]` float, 1 for a real example, 0 for padding. Padded
      examples change nothing: not the loss, the gradient, the metrics or the counts.
    client_ids: optional `[clients]` uint32, a stable key of each client's identity (e.g. the low
      32 bits of `fl.data.client_key(id)`); device-side randomness is keyed by it, never by a
      client's position in the cohort. None: the positions `0..clients-1` stand in.
  """

  batch: Any
  mask: Any
  client_ids: Any = None


def client_batches_spec(
  input_spec: Any, num_clients: int, num_steps: int, batch_size: int | None = None
) -> ClientBatches:
  """A `ClientBatches` of `jax.ShapeDtypeStruct`s for a model's `input_spec` (one batch).

  The batch dimension of `input_spec` is used when known, else `batch_size` (default 1).
  """

  def leaf(s):
    b = s.shape[0] if s.shape and s.shape[0] is not None else (batch_size or 1)
    return jax.ShapeDtypeStruct((num_clients, num_steps, b, *s.shape[1:]), s.dtype)

  batch = jax.tree.map(leaf, input_spec)
  b = jax.tree.leaves(batch)[0].shape[2]
  return ClientBatches(
    batch,
    jax.ShapeDtypeStruct((num_clients, num_steps, b), np.float32),
    jax.ShapeDtypeStruct((num_clients,), np.uint32),
  )


def check_client_batches(client_batches: Any, input_spec: Any, name: str = 'client_batches'):
  """Raises a ValueError/TypeError naming what is wrong with `client_batches` for `input_spec`."""
  if not isinstance(client_batches, ClientBatches):
    raise TypeError(
      f'{name} must be a fedjax_lite.ClientBatches(batch, mask); got '
      f'{type(client_batches).__name__}. Tip: build one with fl.data.build_client_batches.'
    )
  mask_shape = tuple(np.shape(client_batches.mask))
  if len(mask_shape) != 3:
    raise ValueError(f'{name}.mask has shape {mask_shape}; expected (clients, steps, batch_size)')
  ids = client_batches.client_ids
  if ids is not None:
    ids_dtype = np.dtype(ids.dtype if hasattr(ids, 'dtype') else np.asarray(ids).dtype)
    if tuple(np.shape(ids)) != mask_shape[:1] or ids_dtype != np.uint32:
      raise ValueError(
        f'{name}.client_ids is {ids_dtype.name}{list(np.shape(ids))}; expected uint32'
        f'[{mask_shape[0]}], one id per client. Tip: fl.data.batch_cohort fills them, from '
        'fl.data.client_key(id) % 2**32.'
      )
  expected_struct = jax.tree.structure(input_spec)
  got_struct = jax.tree.structure(client_batches.batch)
  if expected_struct != got_struct:
    raise ValueError(
      f'{name}.batch has tree structure {got_struct}; expected {expected_struct} from input_spec'
    )
  spec_paths = jax.tree_util.tree_flatten_with_path(input_spec)[0]
  for (path, spec), leaf in zip(spec_paths, jax.tree.leaves(client_batches.batch), strict=True):
    shape = tuple(np.shape(leaf))
    where = f'{name} leaf {jax.tree_util.keystr(path)}'
    expected_rest = tuple(spec.shape[1:])
    spec_batch = spec.shape[0] if spec.shape else None
    if (
      len(shape) != len(spec.shape) + 2
      or shape[:3] != mask_shape
      or shape[3:] != expected_rest
      or (spec_batch is not None and shape[2] != spec_batch)
    ):
      raise ValueError(
        f'{where} has shape {shape}; expected (clients, steps, batch_size, ...) = '
        f'{(*mask_shape, *expected_rest)} from the mask and input_spec {tuple(spec.shape)}'
      )
    dtype = np.dtype(leaf.dtype if hasattr(leaf, 'dtype') else np.asarray(leaf).dtype)
    if dtype != np.dtype(spec.dtype):
      raise TypeError(f'{where} has dtype {dtype}; expected {np.dtype(spec.dtype)} from input_spec')


def check_unique(ids: Sequence[Any], name: str) -> None:
  """Raises a ValueError naming the first id of `ids` that appears twice, and where.

  A cohort samples clients without replacement: a client listed twice would train twice and
  count twice in the aggregate (and share its randomness, keyed by id, with its copy).
  """
  first: dict[Any, int] = {}
  for i, client_id in enumerate(ids):
    key = client_id.item() if isinstance(client_id, np.generic) else client_id
    if key in first:
      raise ValueError(
        f'{name} lists client {client_id!r} twice (positions {first[key]} and {i}); a cohort '
        'holds each client once, or it trains and counts twice. Tip: sample without '
        'replacement (fl.data.sample_cohort does), or drop the repeats.'
      )
    first[key] = i


def aligned_zeros(shape: tuple, dtype: np.dtype, alignment: int = 64) -> np.ndarray:
  """Zeros whose buffer starts on an `alignment`-byte boundary.

  XLA:CPU adopts a host buffer without copying only when it is 64-byte aligned; numpy
  guarantees 16. For a cohort of tens of MB the copy would cost as much as the batching.
  """
  dtype = np.dtype(dtype)
  nbytes = int(np.prod(shape)) * dtype.itemsize
  raw = np.zeros(nbytes + alignment, np.uint8)
  offset = -raw.ctypes.data % alignment
  return raw[offset : offset + nbytes].view(dtype).reshape(shape)


def client_steps(
  num_examples: int, num_epochs: int, batch_size: int, max_steps: int | None = None
) -> int:
  """Steps a client with `num_examples` takes: `ceil(num_examples * num_epochs / batch_size)`,
  capped at `max_steps`."""
  steps = -(-num_examples * num_epochs // batch_size)
  return steps if max_steps is None else min(steps, max_steps)


def build_client_batches(
  clients: Sequence[Mapping[str, np.ndarray]],
  *,
  batch_size: int,
  num_epochs: int = 1,
  max_steps: int | None = None,
  num_steps: int | None = None,
  seed: int | Sequence[int] = 0,
  client_keys: Sequence[int] | None = None,
  shuffle: bool = True,
) -> ClientBatches:
  """Pads and masks the datasets of a cohort into one `ClientBatches` (host numpy arrays).

  Each client's examples are shuffled once per epoch (seeded by `seed` and the client's key,
  by default its position), the epochs concatenated and cut into batches of `batch_size`; only
  the very last batch may be partial (TFF's `shuffle().repeat(E).batch(B)`). At most
  `max_steps` batches are kept. Clients are padded to the same number of steps with masked
  (zero) examples.

  Args:
    clients: one mapping of name -> array `[n_i, ...]` per client (all clients the same names,
      trailing shapes and dtypes); `n_i` may be 0.
    batch_size: examples per step.
    num_epochs: passes over each client's data.
    max_steps: optional cap on steps per client.
    num_steps: pad to this many steps (>= the longest client); default the longest client.
      A fixed value keeps the compiled round's shapes, and so its compilation, fixed.
    seed: an int or a sequence of ints (e.g. `(seed, round_num)`) seeding the shuffles.
    client_keys: one non-negative int per client mixed into its shuffle seed (e.g. a stable
      hash of its id, so a client's order does not depend on where it sits in the cohort);
      default the positions `0..len(clients)-1`. No key may repeat (a ValueError names it).
    shuffle: whether to shuffle within each epoch.

  Returns:
    `ClientBatches` with leaves `[clients, steps, batch_size, ...]`, a float32 mask, and
    `client_ids` the low 32 bits of `client_keys`.
  """
  if not clients:
    raise ValueError('clients is empty; expected at least one client dataset')
  for name, value, low in [('batch_size', batch_size, 1), ('num_epochs', num_epochs, 1)]:
    if not isinstance(value, int) or value < low:
      raise ValueError(f'{name} must be an int >= {low}; got {value!r}')
  if max_steps is not None and (not isinstance(max_steps, int) or max_steps < 1):
    raise ValueError(f'max_steps must be None or an int >= 1; got {max_steps!r}')
  keys = sorted(clients[0])
  sizes = []
  for i, client in enumerate(clients):
    if sorted(client) != keys:
      raise ValueError(f'clients[{i}] has keys {sorted(client)}; expected {keys} like clients[0]')
    lengths = {k: len(client[k]) for k in keys}
    if len(set(lengths.values())) != 1:
      raise ValueError(f'clients[{i}] arrays differ in length: {lengths}')
    for k in keys:
      a, a0 = np.asarray(client[k]), np.asarray(clients[0][k])
      if a.shape[1:] != a0.shape[1:] or a.dtype != a0.dtype:
        raise ValueError(
          f"clients[{i}]['{k}'] is {a.dtype}{list(a.shape[1:])} per example; expected "
          f'{a0.dtype}{list(a0.shape[1:])} like clients[0]'
        )
    sizes.append(lengths[keys[0]])
  steps = [client_steps(n, num_epochs, batch_size, max_steps) for n in sizes]
  longest = max(max(steps), 1)
  if num_steps is None:
    num_steps = longest
  elif num_steps < longest:
    raise ValueError(f'num_steps={num_steps} is below the longest client ({longest} steps)')
  seed_words = [seed] if isinstance(seed, int) else list(seed)
  if client_keys is None:
    client_keys = range(len(clients))
  elif len(client_keys) != len(clients):
    raise ValueError(
      f'client_keys has {len(client_keys)} entries; expected one per client ({len(clients)})'
    )
  else:
    check_unique(client_keys, 'client_keys')
  capacity = num_steps * batch_size
  batch = {
    k: aligned_zeros(
      (len(clients), capacity, *np.shape(clients[0][k])[1:]), np.asarray(clients[0][k]).dtype
    )
    for k in keys
  }
  mask = aligned_zeros((len(clients), capacity), np.float32)
  for i, (client, n, s, key) in enumerate(zip(clients, sizes, steps, client_keys, strict=True)):
    rng = np.random.default_rng([*seed_words, key])
    order = np.concatenate(
      [rng.permutation(n) if shuffle else np.arange(n) for _ in range(num_epochs)]
    )[: s * batch_size]
    for k in keys:
      batch[k][i, : len(order)] = np.asarray(client[k])[order]
    mask[i, : len(order)] = 1.0
  shape = (len(clients), num_steps, batch_size)
  return ClientBatches(
    {k: v.reshape(*shape, *v.shape[2:]) for k, v in batch.items()},
    mask.reshape(shape),
    np.asarray([int(k) & 0xFFFFFFFF for k in client_keys], np.uint32),
  )
