"""`Prefetcher`: rounds built ahead on a thread, in order, restartable, errors re-raised."""

import threading

import jax
import numpy as np
import pytest

import fedjax_lite as fl


def test_builds_ahead_in_order_and_device_puts():
  built = []
  ahead = threading.Event()

  def build(round_num):
    built.append(round_num)
    if round_num == 2:
      ahead.set()
    return {'x': np.full(3, round_num, np.float32)}

  with fl.data.Prefetcher(build, stop=5) as prefetch:
    first = prefetch(1)
    assert isinstance(first['x'], jax.Array)
    np.testing.assert_array_equal(first['x'], 1.0)
    assert ahead.wait(5), 'round 2 was not built ahead of its call'
    for r in (2, 3, 4):
      np.testing.assert_array_equal(prefetch(r)['x'], float(r))
    with pytest.raises(ValueError, match='round_num=5 is at or past stop=5'):
      prefetch(5)
  assert built == [1, 2, 3, 4]
  assert prefetch.wait_seconds >= 0.0


def test_out_of_order_request_restarts_from_that_round():
  with fl.data.Prefetcher(lambda r: r, device_put=False, buffer_size=2) as prefetch:
    assert [prefetch(r) for r in (3, 4)] == [3, 4]
    assert prefetch(10) == 10  # e.g. a resumed run
    assert prefetch(11) == 11
    assert prefetch(2) == 2


def test_errors_reach_the_caller_of_that_round():
  def build(round_num):
    if round_num == 2:
      raise OSError('disk gone')
    return round_num

  prefetch = fl.data.Prefetcher(build, device_put=False)
  assert prefetch(1) == 1
  with pytest.raises(OSError, match='disk gone'):
    prefetch(2)
  assert prefetch(3) == 3  # restarts after the failure
  prefetch.close()


def test_close_stops_the_thread():
  prefetch = fl.data.Prefetcher(lambda r: r, device_put=False, buffer_size=1)
  prefetch(0)
  thread = prefetch._thread
  assert thread.is_alive()
  prefetch.close()
  assert not thread.is_alive()


def test_bad_arguments():
  with pytest.raises(TypeError, match='build_fn must be callable'):
    fl.data.Prefetcher(3)
  with pytest.raises(ValueError, match='buffer_size must be an int >= 1; got 0'):
    fl.data.Prefetcher(lambda r: r, buffer_size=0)
