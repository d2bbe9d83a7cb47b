"""CompileTimer: the seconds JAX spends compiling, counted once where compilations nest, and
the rate of the progress bar without them."""

import time

import jax
import jax.numpy as jnp
import pytest

from fedjax_lite.simulation import _progress


def test_compile_seconds_are_taken_round_by_round():
  inner = jax.jit(jnp.cos)
  outer = jax.jit(lambda x: jnp.sin(x) @ x.T + inner(x))
  x = jnp.ones((64, 64))
  with _progress.CompileTimer() as timer:
    start = time.perf_counter()
    jax.block_until_ready(outer(x))  # traces outer and inner, lowers and compiles
    first_call = time.perf_counter() - start
    compiled = timer.take()
    assert 0 < compiled <= first_call
    jax.block_until_ready(outer(x))  # cached: nothing compiles
    assert timer.take() == 0
  assert timer.total == compiled
  jax.block_until_ready(jax.jit(jnp.tanh)(x))  # the timer is closed: no longer counted
  assert timer.take() == 0


def test_nested_and_overlapping_spans_count_once():
  with _progress.CompileTimer() as timer:
    for start, end in [(10.0, 14.0), (11.0, 12.0), (13.0, 15.0), (20.0, 21.0)]:
      jax.monitoring.record_event_time_span(_progress.COMPILE_EVENTS[0], start, end)
    jax.monitoring.record_event_time_span('/jax/some/other_event', 0.0, 100.0)
    assert timer.take() == pytest.approx(6.0)  # [10, 15] and [20, 21]
