"""The cohort loop: one per-client step function over every client of a round, in one program.

Clients run in chunks: inside a chunk the per-client step is `jax.vmap`ped, a `lax.while_loop`
walks the chunk's steps, and a `lax.scan` walks the chunks. Clients are ordered by their number
of real steps before chunking, and each chunk stops at its longest client, so a skewed cohort
does not pay for padding up to the longest client of the whole cohort. Outputs are written back
in the cohort's original client order.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches

# On a CPU, vmapping a few clients at a time beats both one-at-a-time and the whole cohort at
# once (shared/WORKLOAD.md); accelerators want the widest vmap that fits.
_CPU_CHUNK = 8
_ACCELERATOR_CHUNK = 256


def default_chunk_size(num_clients: int) -> int:
  """Clients vmapped together: a few on a CPU, up to 256 on an accelerator."""
  chunk = _CPU_CHUNK if jax.default_backend() == 'cpu' else _ACCELERATOR_CHUNK
  return max(1, min(chunk, num_clients))


def check_chunk_size(client_chunk_size: int | None) -> None:
  if client_chunk_size is not None and (
    not isinstance(client_chunk_size, int) or client_chunk_size < 1
  ):
    raise ValueError(f'client_chunk_size must be None or an int >= 1; got {client_chunk_size!r}')


def steps_per_client(mask: jax.Array) -> jax.Array:
  """`[clients]` int32: 1 + the index of each client's last step holding a real example."""
  num_steps = mask.shape[1]
  has_data = jnp.any(mask > 0, axis=2)
  return jnp.max(jnp.where(has_data, jnp.arange(1, num_steps + 1, dtype=jnp.int32), 0), axis=1)


def run_clients(
  init_fn: Callable[[jax.Array], Any],
  step_fn: Callable[[Any, Any, jax.Array, jax.Array], Any],
  finalize_fn: Callable[[Any], Any],
  client_batches: _client_batches.ClientBatches,
  client_chunk_size: int | None = None,
) -> Any:
  """Runs every client's local loop; returns per-client outputs `[clients, ...]`.

  Args:
    init_fn: `(client_index []) -> carry` for one client.
    step_fn: `(carry, batch, mask [batch_size], step []) -> carry` for one client and one step.
      Steps whose mask is all zero keep the old carry, whatever `step_fn` returns.
    finalize_fn: `(carry) -> output` for one client.
    client_batches: leaves `[clients, steps, batch_size, ...]`, mask `[clients, steps,
      batch_size]`.
    client_chunk_size: clients vmapped together; default `default_chunk_size`.

  Returns:
    `finalize_fn`'s outputs stacked over clients, in the order of `client_batches`.
  """
  batch, mask = jax.tree.map(jnp.asarray, tuple(client_batches))
  num_clients = mask.shape[0]
  chunk = min(client_chunk_size or default_chunk_size(num_clients), num_clients)
  num_chunks = -(-num_clients // chunk)
  # Even chunks: 100 clients at 32 run as 4 chunks of 25, not 4 of 32 with 28 empty lanes.
  chunk = -(-num_clients // num_chunks)
  client_steps = steps_per_client(mask)
  order = jnp.argsort(-client_steps, stable=True).astype(jnp.int32)
  # Index `num_clients` marks the filler slots of the last chunk: masked out, outputs dropped.
  filler = jnp.full((num_chunks * chunk - num_clients,), num_clients, jnp.int32)
  order = jnp.concatenate([order, filler]).reshape(num_chunks, chunk)

  out_spec = jax.eval_shape(finalize_fn, jax.eval_shape(init_fn, jnp.int32(0)))
  outputs = jax.tree.map(lambda s: jnp.zeros((num_clients, *s.shape), s.dtype), out_spec)
  vstep = jax.vmap(step_fn, in_axes=(0, 0, 0, None))

  def run_chunk(outputs, clients):
    real = clients < num_clients
    rows = jnp.where(real, clients, 0)
    last_step = jnp.max(jnp.where(real, client_steps[rows], 0))

    def body(loop):
      step, carry = loop
      step_batch = jax.tree.map(lambda x: x[rows, step], batch)
      step_mask = mask[rows, step] * real[:, None].astype(mask.dtype)
      new_carry = vstep(carry, step_batch, step_mask, step)
      has_data = jnp.any(step_mask > 0, axis=1)
      return step + 1, jax.vmap(tree_lib.tree_where)(has_data, new_carry, carry)

    carry = jax.vmap(init_fn)(rows)
    _, carry = lax.while_loop(lambda loop: loop[0] < last_step, body, (jnp.int32(0), carry))
    chunk_out = jax.vmap(finalize_fn)(carry)
    outputs = jax.tree.map(
      lambda buf, out: buf.at[clients].set(out, mode='drop'), outputs, chunk_out
    )
    return outputs, None

  outputs, _ = lax.scan(run_chunk, outputs, order)
  return outputs
