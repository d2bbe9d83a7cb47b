"""Dataset split functions: a client's batches cut into a reconstruction and a post-reconstruction
sequence, TFF's `ReconstructionDatasetSplitFn` acting on padded, masked `ClientBatches`.

A split function maps `ClientBatches` (`[clients, steps, batch_size, ...]`) to a pair of
`ClientBatches`, `(reconstruction, post_reconstruction)`, inside `jit`: shapes depend only on the
input's shapes. The real batches of each phase are packed at the front of its step axis, with
zeroed, masked padding after them; one pass over every batch is the input itself. A client's
batches are its steps holding at least one real example, in step order (what TFF's
`tf.data.Dataset` of that client would yield).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

from fedjax_lite.data import _client_batches

DatasetSplitFn = Callable[
  [_client_batches.ClientBatches],
  tuple[_client_batches.ClientBatches, _client_batches.ClientBatches],
]


def simple_dataset_split_fn(
  client_batches: _client_batches.ClientBatches,
) -> tuple[_client_batches.ClientBatches, _client_batches.ClientBatches]:
  """Both phases iterate over all of a client's batches once: `(client_batches, client_batches)`."""
  return client_batches, client_batches


def _check_count(name: str, value, minimum: int, allow_none: bool) -> None:
  if value is None and allow_none:
    return
  if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
    expected = f'an int >= {minimum}' + (' or None' if allow_none else '')
    raise ValueError(f'{name} must be {expected}; got {value!r}')


def _phase_batches(
  batch, mask, selected: jax.Array | None, capacity: int, epochs: int, steps_max: int | None
) -> _client_batches.ClientBatches:
  """The selected steps of each client, repeated `epochs` times, then the first `steps_max`.

  Args:
    selected: `[clients, steps]` bool, the steps of this phase (all real), or None for every
      step: one pass over all steps is then the input itself, with no copy (a step without
      real examples changes nothing wherever it sits).
    capacity: a static bound on any client's selected steps.
  """
  if selected is None:
    if epochs == 1 and steps_max is None:
      return _client_batches.ClientBatches(batch, mask)
    selected = jnp.any(mask > 0, axis=2)
  num_steps = max(1, epochs * capacity if steps_max is None else min(epochs * capacity, steps_max))
  count = jnp.sum(selected, axis=1)  # [clients]
  # Each client's selected steps first, in step order.
  order = jnp.argsort(~selected, axis=1, stable=True)
  t = jnp.arange(num_steps)
  source = jnp.take_along_axis(order, t[None, :] % jnp.maximum(count, 1)[:, None], axis=1)
  limit = epochs * count if steps_max is None else jnp.minimum(epochs * count, steps_max)
  active = t[None, :] < limit[:, None]  # [clients, num_steps]

  def gather(x):
    rows = jax.vmap(lambda leaf, src: leaf[src])(x, source)
    keep = jnp.reshape(active, active.shape + (1,) * (rows.ndim - 2))
    return jnp.where(keep, rows, jnp.zeros((), rows.dtype))

  return _client_batches.ClientBatches(jax.tree.map(gather, batch), gather(mask))


def build_dataset_split_fn(
  recon_epochs: int = 1,
  recon_steps_max: int | None = None,
  post_recon_epochs: int = 1,
  post_recon_steps_max: int | None = None,
  split_dataset: bool = False,
) -> DatasetSplitFn:
  """A split function with TFF's semantics (`build_dataset_split_fn`).

  With `split_dataset`, a client's even batches (0, 2, 4, ...) reconstruct and its odd batches
  (1, 3, ...) post-reconstruct; otherwise both phases see every batch. Each phase then repeats
  its batches `*_epochs` times and keeps the first `*_steps_max` (counted across epochs).

  Example:
    >>> split = fl.reconstruction.build_dataset_split_fn(split_dataset=True)
    >>> recon, post = split(client_batches)  # [clients, ceil(steps/2), ...], [.., steps//2, ..]

  Args:
    recon_epochs: passes over the reconstruction batches, >= 1.
    recon_steps_max: optional cap on reconstruction steps, >= 1.
    post_recon_epochs: passes over the post-reconstruction batches, >= 1.
    post_recon_steps_max: optional cap on post-reconstruction steps, >= 1.
    split_dataset: whether the two phases take disjoint (even / odd) batches.

  Returns:
    `(client_batches) -> (reconstruction, post_reconstruction)`, each a `ClientBatches` whose
    steps axis is static: `min(epochs · steps, steps_max)` (steps halved, rounded up for
    reconstruction and down after, with `split_dataset`; at least 1).
  """
  _check_count('recon_epochs', recon_epochs, 1, False)
  _check_count('recon_steps_max', recon_steps_max, 1, True)
  _check_count('post_recon_epochs', post_recon_epochs, 1, False)
  _check_count('post_recon_steps_max', post_recon_steps_max, 1, True)
  if not isinstance(split_dataset, bool):
    raise TypeError(f'split_dataset must be a bool; got {split_dataset!r}')

  def dataset_split_fn(client_batches):
    if not isinstance(client_batches, _client_batches.ClientBatches):
      raise TypeError(
        f'client_batches must be a ClientBatches; got {type(client_batches).__name__}'
      )
    batch, mask = jax.tree.map(jnp.asarray, (client_batches.batch, client_batches.mask))
    if mask.ndim != 3:
      raise ValueError(
        f'client_batches.mask has shape {mask.shape}; expected (clients, steps, batch_size)'
      )
    num_steps = mask.shape[1]
    if split_dataset:
      real = jnp.any(mask > 0, axis=2)
      index = jnp.cumsum(real, axis=1) - 1  # the batch's position among the client's batches
      recon, post = real & (index % 2 == 0), real & (index % 2 == 1)
      recon_capacity, post_capacity = -(-num_steps // 2), num_steps // 2
    else:
      recon = post = None
      recon_capacity = post_capacity = num_steps
    ids = client_batches.client_ids
    return (
      _phase_batches(batch, mask, recon, recon_capacity, recon_epochs, recon_steps_max)._replace(
        client_ids=ids
      ),
      _phase_batches(
        batch, mask, post, post_capacity, post_recon_epochs, post_recon_steps_max
      )._replace(client_ids=ids),
    )

  return dataset_split_fn
