"""The cohort loop: padding changes nothing; clients come back in their own order."""

import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl
from fedjax_lite.templates import _cohort

SIZES = [9, 2, 14, 5]


def _pad(batches, extra_steps, extra_rows, extra_clients, junk):
  """Adds masked steps, masked rows per batch and empty clients, all filled with `junk`."""
  x, y, mask = (np.asarray(a) for a in (batches.batch['x'], batches.batch['y'], batches.mask))
  c, s, b = mask.shape
  shape = (c + extra_clients, s + extra_steps, b + extra_rows)
  new_x = np.full((*shape, x.shape[-1]), junk, np.float32)
  new_y = np.full(shape, 1, np.int32)
  new_mask = np.zeros(shape, np.float32)
  new_x[:c, :s, :b], new_y[:c, :s, :b], new_mask[:c, :s, :b] = x, y, mask
  return fl.ClientBatches({'x': new_x, 'y': new_y}, new_mask)


def _run(batches, chunk):
  model = ref.linear_model(5, 3)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1, momentum=0.9), client_chunk_size=chunk
  )
  state, metrics = process.next(process.initialize(), batches)
  return process.get_model_weights(state).trainable, metrics


@settings(max_examples=5, deadline=None)
@given(
  extra_steps=st.integers(0, 3),
  extra_rows=st.integers(0, 3),
  extra_clients=st.integers(0, 2),
  junk=st.sampled_from([np.nan, np.inf, -1e30, 7.0]),
  chunk=st.sampled_from([1, 2, 3, 16]),
)
def test_padding_changes_nothing(extra_steps, extra_rows, extra_clients, junk, chunk):
  batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4, num_epochs=2)
  weights, metrics = _run(batches, chunk)
  padded_weights, padded_metrics = _run(
    _pad(batches, extra_steps, extra_rows, extra_clients, junk), chunk
  )
  for k in weights:
    np.testing.assert_allclose(padded_weights[k], weights[k], rtol=1e-5, atol=1e-6)
  train, padded_train = metrics['client_work']['train'], padded_metrics['client_work']['train']
  assert int(padded_train['num_examples']) == int(train['num_examples']) == 2 * sum(SIZES)
  np.testing.assert_allclose(padded_train['loss'], train['loss'], rtol=1e-5)
  np.testing.assert_allclose(padded_train['accuracy'], train['accuracy'], rtol=1e-6)
  assert int(padded_metrics['client_work']['non_finite_clients']) == 0


def test_a_padded_step_between_real_steps_is_skipped():
  batches = fl.data.build_client_batches(ref.random_clients([8]), batch_size=4)
  x, y, mask = (np.asarray(a) for a in (batches.batch['x'], batches.batch['y'], batches.mask))
  gap = lambda a, fill: np.concatenate([a[:, :1], np.full_like(a[:, :1], fill), a[:, 1:]], 1)
  with_gap = fl.ClientBatches({'x': gap(x, np.nan), 'y': gap(y, 0)}, gap(mask, 0))
  weights, _ = _run(batches, 1)
  gap_weights, _ = _run(with_gap, 1)
  for k in weights:
    np.testing.assert_allclose(gap_weights[k], weights[k], rtol=1e-6)


@settings(max_examples=10, deadline=None)
@given(
  steps=st.lists(st.integers(0, 5), min_size=1, max_size=9),
  chunk=st.integers(1, 4),
)
def test_outputs_come_back_in_client_order(steps, chunk):
  """Each client counts its real steps; the sort by length must be undone on the way out."""
  max_steps = max(max(steps), 1)
  mask = np.zeros((len(steps), max_steps, 2), np.float32)
  for c, n in enumerate(steps):
    mask[c, :n] = 1.0
  batches = fl.ClientBatches({'v': np.ones((len(steps), max_steps, 2), np.float32)}, mask)
  summed, out = _cohort.run_clients(
    init_fn=lambda client_input, client_id: (jnp.int32(0), client_id),
    step_fn=lambda carry, batch, mask, step: (carry[0] + 1, carry[1]),
    finalize_fn=lambda carry, client_input, client_id: (carry[0], carry),
    client_batches=batches,
    client_chunk_size=chunk,
  )
  np.testing.assert_array_equal(out[0], steps)
  np.testing.assert_array_equal(out[1], np.arange(len(steps)))
  assert int(summed) == sum(steps)


def test_steps_per_client_counts_to_the_last_real_step():
  mask = np.zeros((3, 4, 2), np.float32)
  mask[0, 0, 0] = 1
  mask[1, 3, 1] = 1  # only the last step is real
  np.testing.assert_array_equal(_cohort.steps_per_client(jnp.asarray(mask)), [1, 4, 0])


def test_chunks_are_even(monkeypatch):
  """100 clients at chunk 32 run as 4 chunks of 25: no lane of a chunk is an empty filler."""
  seen = []
  real_scan = _cohort.lax.scan

  def spy_scan(f, init, xs, *args, **kwargs):
    seen.append(xs.shape)
    return real_scan(f, init, xs, *args, **kwargs)

  monkeypatch.setattr(_cohort.lax, 'scan', spy_scan)
  mask = np.ones((100, 1, 1), np.float32)
  _cohort.run_clients(
    lambda client_input, client_id: jnp.int32(0),
    lambda c, b, m, s: c + 1,
    lambda c, client_input, client_id: (c, ()),
    fl.ClientBatches({'v': mask}, mask),
    client_chunk_size=32,
  )
  assert seen == [(4, 25)]


def test_one_client_a_lane_runs_unbatched_matmuls():
  """At chunk 1 the client's step is not vmapped: its matmuls are plain dots, not dots batched
  over a client axis of one (which XLA:CPU runs through slower kernels: an LSTM round at chunk 1
  ran 0.56x a Python loop of the same steps, 1.05x once unbatched)."""
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), client_chunk_size=1
  )
  batches = fl.data.build_client_batches(ref.random_clients([4, 6, 3]), batch_size=2)
  text = process.next.lower(process.initialize(), batches).as_text()
  dots = [line for line in text.splitlines() if 'dot_general' in line]
  assert dots and not [line for line in dots if 'batching_dims' in line], dots[:3]
  chunked = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), client_chunk_size=3
  )
  text = chunked.next.lower(chunked.initialize(), batches).as_text()
  assert [line for line in text.splitlines() if 'dot_general' in line and 'batching_dims' in line]
