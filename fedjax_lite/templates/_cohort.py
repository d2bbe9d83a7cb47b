"""The cohort loop: per-client functions run over every client of a round, in one program.

Clients run in chunks: inside a chunk the per-client step is `jax.vmap`ped, a `lax.while_loop`
walks the chunk's steps, and a `lax.scan` walks the chunks. Clients are ordered by their number
of real steps before chunking, and each chunk stops at its longest client, so a skewed cohort
does not pay for padding up to the longest client of the whole cohort. A chunk of one client
runs unbatched.

What a client finalizes into leaves the loop two ways: a part that is **summed** over clients as
the chunks go (the scan carries one accumulator, so memory is set by the chunk, not the cohort),
and a part that is **stacked** `[clients, ...]` in cohort order (per-client outputs). With a
`Mesh` whose axis `'clients'` spans the devices, each device runs this loop over its own
clients (`shard_map`) and the accumulators are combined once, by one `psum` after the loop.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import Mesh, PartitionSpec

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _layout

# On a CPU, vmapping a few clients at a time beats both one-at-a-time and the whole cohort at
# once (benchmarks/WORKLOAD.md); accelerators want the widest vmap that fits. Vmapped over
# clients, a convolution with per-client kernels becomes a grouped convolution, which XLA:CPU
# runs ~3x slower than the clients' convolutions one by one, and a recurrent layer's many small
# matmuls lose more to batching than they gain: convolutional and recurrent models run one
# client per lane there.
_CPU_CHUNK = 4
CPU_ONE_LANE_CHUNK = 1
_ACCELERATOR_CHUNK = 256

CLIENTS_AXIS = 'clients'


def default_chunk_size(num_clients: int) -> int:
  """Clients vmapped together: a few on a CPU, up to 256 on an accelerator (convolutional
  and recurrent models on a CPU: `CPU_ONE_LANE_CHUNK`, chosen by `build_client_work`)."""
  chunk = _CPU_CHUNK if jax.default_backend() == 'cpu' else _ACCELERATOR_CHUNK
  return max(1, min(chunk, num_clients))


def check_chunk_size(client_chunk_size: int | str | None) -> None:
  if client_chunk_size is None or client_chunk_size == _layout.AUTO:
    return
  if (
    isinstance(client_chunk_size, bool)
    or not isinstance(client_chunk_size, int)
    or (client_chunk_size < 1)
  ):
    raise ValueError(
      f"client_chunk_size must be 'auto', None or an int >= 1; got {client_chunk_size!r}"
    )


def check_mesh(mesh: Any) -> None:
  """Raises unless `mesh` is None or a `jax.sharding.Mesh` with a `'clients'` axis."""
  if mesh is None:
    return
  if not isinstance(mesh, Mesh):
    raise TypeError(f'mesh must be None or a jax.sharding.Mesh; got {type(mesh).__name__}')
  if CLIENTS_AXIS not in mesh.axis_names:
    raise ValueError(
      f"mesh must have an axis named '{CLIENTS_AXIS}' to shard the cohort over; its axes are "
      f"{mesh.axis_names}. Tip: Mesh(jax.devices(), ('clients',))."
    )


def steps_per_client(mask: jax.Array) -> jax.Array:
  """`[clients]` int32: 1 + the index of each client's last step holding a real example."""
  num_steps = mask.shape[1]
  has_data = jnp.any(mask > 0, axis=2)
  return jnp.max(jnp.where(has_data, jnp.arange(1, num_steps + 1, dtype=jnp.int32), 0), axis=1)


def client_ids(client_batches: _client_batches.ClientBatches) -> jax.Array:
  """`[clients]` uint32: the batches' client ids, or the positions when they carry none."""
  if client_batches.client_ids is None:
    return jnp.arange(client_batches.mask.shape[0], dtype=jnp.uint32)
  return jnp.asarray(client_batches.client_ids, jnp.uint32)


def _one_lane(fn: Callable) -> Callable:
  """`jax.vmap(fn)` for a batch of one: `fn` itself on the squeezed arguments, its outputs given
  the axis back. A vmap of one client makes every matmul and convolution a batched one of batch
  1, which XLA:CPU runs through slower kernels than the plain op (an LSTM round at one client a
  lane ran 1.8x slower than a Python loop of the same steps)."""

  def call(*args):
    squeezed = jax.tree.map(lambda x: x[0], args)
    return jax.tree.map(lambda x: x[None], fn(*squeezed))

  return call


def _local_loop(init_fn, step_fn, finalize_fn, chunk_size, batch, mask, ids, inputs, present):
  """The chunked loop over the clients this device holds; returns `(summed, stacked)`."""
  num_clients = mask.shape[0]
  if chunk_size == _layout.AUTO:  # the chunk a TunedNext traces this round with, if any
    chunk_size = _layout.traced_chunk()
  chunk = min(chunk_size or default_chunk_size(num_clients), num_clients)
  num_chunks = -(-num_clients // chunk)
  # Even chunks: 100 clients at 32 run as 4 chunks of 25, not 4 of 32 with 28 empty lanes.
  chunk = -(-num_clients // num_chunks)
  client_steps = steps_per_client(mask)
  order = jnp.argsort(-client_steps, stable=True).astype(jnp.int32)
  # Index `num_clients` marks the filler lanes of the last chunk: masked out, outputs dropped.
  filler = jnp.full((num_chunks * chunk - num_clients,), num_clients, jnp.int32)
  order = jnp.concatenate([order, filler]).reshape(num_chunks, chunk)

  take = lambda tree, rows: jax.tree.map(lambda x: x[rows], tree)
  input_spec = jax.eval_shape(lambda: take(inputs, 0))
  carry_spec = jax.eval_shape(init_fn, input_spec, jax.ShapeDtypeStruct((), jnp.uint32))
  summed_spec, stacked_spec = jax.eval_shape(
    finalize_fn, carry_spec, input_spec, jax.ShapeDtypeStruct((), jnp.uint32)
  )
  zeros = lambda s, lead=(): jnp.zeros((*lead, *s.shape), s.dtype)
  summed = jax.tree.map(zeros, summed_spec)
  stacked = jax.tree.map(lambda s: zeros(s, (num_clients,)), stacked_spec)

  # Vmapped over a chunk, or the plain functions at one client a lane (`_one_lane` runs the
  # whole chunk loop on the squeezed client: a `[1, ...]` carry made XLA copy it every step).
  lanes = jax.vmap if chunk > 1 else lambda fn, in_axes=0: fn

  def chunk_loop(rows, real, chunk_inputs, chunk_ids):
    """The local loops of a chunk's clients (`rows`: `[chunk]`, or `[]` at one lane)."""
    last_step = jnp.max(jnp.where(real, client_steps[rows], 0))

    def body(loop):
      step, carry = loop
      step_batch = jax.tree.map(lambda x: x[rows, step], batch)
      step_mask = mask[rows, step] * real[..., None].astype(mask.dtype)
      new_carry = lanes(step_fn, in_axes=(0, 0, 0, None))(carry, step_batch, step_mask, step)
      has_data = jnp.any(step_mask > 0, axis=-1)
      return step + 1, lanes(tree_lib.tree_where)(has_data, new_carry, carry)

    carry = lanes(init_fn)(chunk_inputs, chunk_ids)
    _, carry = lax.while_loop(lambda loop: loop[0] < last_step, body, (jnp.int32(0), carry))
    return lanes(finalize_fn)(carry, chunk_inputs, chunk_ids)

  run_lanes = chunk_loop if chunk > 1 else _one_lane(chunk_loop)

  def run_chunk(acc, clients):
    summed, stacked = acc
    real = clients < num_clients
    rows = jnp.where(real, clients, 0)
    chunk_summed, chunk_stacked = run_lanes(rows, real, take(inputs, rows), ids[rows])
    summed = tree_lib.tree_add(
      summed, tree_lib.tree_sum_over_clients(chunk_summed, real & present[rows])
    )
    stacked = jax.tree.map(
      lambda buf, out: buf.at[clients].set(out, mode='drop'), stacked, chunk_stacked
    )
    return (summed, stacked), None

  (summed, stacked), _ = lax.scan(run_chunk, (summed, stacked), order)
  return summed, stacked


def run_clients(
  init_fn: Callable[[Any, jax.Array], Any],
  step_fn: Callable[[Any, Any, jax.Array, jax.Array], Any],
  finalize_fn: Callable[[Any, Any, jax.Array], tuple[Any, Any]],
  client_batches: _client_batches.ClientBatches,
  client_inputs: Any = (),
  *,
  client_chunk_size: int | str | None = None,
  mesh: Mesh | None = None,
) -> tuple[Any, Any]:
  """Runs every client's local loop; returns `(summed over clients, stacked [clients, ...])`.

  Args:
    init_fn: `(client_input, client_id [] uint32) -> carry` for one client.
    step_fn: `(carry, batch, mask [batch_size], step []) -> carry` for one client and one step.
      Steps whose mask is all zero keep the old carry, whatever `step_fn` returns.
    finalize_fn: `(carry, client_input, client_id) -> (summed, stacked)` for one client: the
      first part is added up over the cohort's clients, the second is returned per client.
    client_batches: leaves `[clients, steps, batch_size, ...]`, mask `[clients, steps,
      batch_size]`, optional `client_ids` `[clients]`.
    client_inputs: a pytree with leaves `[clients, ...]`, one slice per client (or `()`).
    client_chunk_size: clients vmapped together; default `default_chunk_size`; `'auto'`: the
      chunk the `TunedNext` tracing this round chose (`_layout`), else the default.
    mesh: optional `Mesh` with a `'clients'` axis: each device runs the loop over its own
      clients and the sums are combined by one `psum`; a cohort that does not divide by the
      device count is padded with empty clients, which contribute nothing.

  Returns:
    The sum of `finalize_fn`'s first outputs over the clients (no client axis), and its second
    outputs stacked over clients in the order of `client_batches`.
  """
  batch = jax.tree.map(jnp.asarray, client_batches.batch)
  mask = jnp.asarray(client_batches.mask)
  ids = client_ids(client_batches)
  inputs = jax.tree.map(jnp.asarray, client_inputs)
  num_clients = mask.shape[0]
  present = jnp.ones((num_clients,), bool)
  args = (batch, mask, ids, inputs, present)
  if mesh is None:
    return _local_loop(init_fn, step_fn, finalize_fn, client_chunk_size, *args)

  num_devices = mesh.shape[CLIENTS_AXIS]
  extra = -num_clients % num_devices
  if extra:
    args = jax.tree.map(lambda x: jnp.pad(x, [(0, extra)] + [(0, 0)] * (x.ndim - 1)), args)

  def per_device(*local_args):
    summed, stacked = _local_loop(init_fn, step_fn, finalize_fn, client_chunk_size, *local_args)
    return lax.psum(summed, CLIENTS_AXIS), stacked

  spec = PartitionSpec(CLIENTS_AXIS)
  summed, stacked = jax.shard_map(
    per_device,
    mesh=mesh,
    in_specs=spec,
    out_specs=(PartitionSpec(), spec),
    # Per-client code is the user's; it cannot be asked to mark values as device-varying.
    check_vma=False,
  )(*args)
  return summed, jax.tree.map(lambda x: x[:num_clients], stacked)
