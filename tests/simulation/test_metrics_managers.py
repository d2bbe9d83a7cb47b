"""Metric flattening and the CSV / JSON Lines / in-memory / TensorBoard managers, read back."""

import glob
import json
import pathlib
import struct
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl


def _text(path):
  return path.read_bytes().decode()  # as written: CSV rows end in \r\n


class _Pair(NamedTuple):
  first: object
  second: object


def test_flatten_metrics_exact():
  metrics = {
    'client_work': {
      'train': {'loss': jnp.float32(0.5), 'num_examples': jnp.int32(12)},
      'non_finite_clients': np.int64(0),
    },
    'finalizer': {},  # empty: adds nothing
    'aggregator': (),
    'flags': jnp.array(True),
    'pair': _Pair(jnp.float32(1.25), [2, 3.5]),
    'per_class': jnp.array([[1, 2], [3, 4]], jnp.int32),
    'name': 'fedavg',
    'py': 7,
  }
  flat = fl.simulation.flatten_metrics(metrics)
  expected = {
    'client_work/train/loss': 0.5,
    'client_work/train/num_examples': 12,
    'client_work/non_finite_clients': 0,
    'flags': True,
    'pair/first': 1.25,
    'pair/second/0': 2,
    'pair/second/1': 3.5,
    'per_class/0/0': 1,
    'per_class/0/1': 2,
    'per_class/1/0': 3,
    'per_class/1/1': 4,
    'name': 'fedavg',
    'py': 7,
  }
  assert flat == expected
  assert list(flat) == list(expected)  # depth-first, in each mapping's order
  assert [type(flat[k]) for k in ('client_work/train/loss', 'per_class/0/0', 'flags')] == [
    float,
    int,
    bool,
  ]
  assert fl.simulation.flatten_metrics(flat) == flat  # idempotent
  with pytest.raises(TypeError, match="metric 'a/b' has a value of type object"):
    fl.simulation.flatten_metrics({'a': {'b': object()}})
  with pytest.raises(TypeError, match='metrics must be a mapping'):
    fl.simulation.flatten_metrics([1, 2])


def _release_sequence(manager):
  """Rounds whose keys change: round 0 evaluation only, round 2 brings a new key."""
  manager.release({'evaluation': {'accuracy': jnp.float32(0.25)}}, 0)
  manager.release({'train': {'loss': jnp.float32(1.5)}}, 1)
  manager.release({'train': {'loss': 1.25}, 'evaluation': {'accuracy': 0.5}, 'extra': 3}, 2)
  manager.release({'train': {'loss': 1.0}}, 3)


def test_csv_header_grows_and_clear_metrics_truncates(tmp_path):
  path = tmp_path / 'metrics.csv'
  manager = fl.simulation.CSVMetricsManager(path)
  _release_sequence(manager)
  assert _text(path) == (
    'round_num,evaluation/accuracy,train/loss,extra\r\n'
    '0,0.25,,\r\n'
    '1,,1.5,\r\n'
    '2,0.5,1.25,3\r\n'
    '3,,1.0,\r\n'
  )
  assert fl.simulation.load_metrics(path) == {
    0: {'evaluation/accuracy': 0.25},
    1: {'train/loss': 1.5},
    2: {'evaluation/accuracy': 0.5, 'train/loss': 1.25, 'extra': 3},
    3: {'train/loss': 1.0},
  }
  # A new manager on the same file (a resumed run) keeps the header and drops rounds >= 2,
  # with the columns only those rounds used; re-releasing gives the same file back.
  resumed = fl.simulation.CSVMetricsManager(path)
  resumed.clear_metrics(2)
  assert _text(path) == 'round_num,evaluation/accuracy,train/loss\r\n0,0.25,\r\n1,,1.5\r\n'
  resumed.release({'train': {'loss': 1.25}, 'evaluation': {'accuracy': 0.5}, 'extra': 3}, 2)
  resumed.release({'train': {'loss': 1.0}}, 3)
  fresh = fl.simulation.CSVMetricsManager(tmp_path / 'fresh.csv')
  _release_sequence(fresh)
  assert _text(path) == _text(tmp_path / 'fresh.csv')
  resumed.clear_metrics(0)
  assert _text(path) == 'round_num\r\n'


def test_csv_drops_a_row_cut_short_by_a_crash(tmp_path):
  path = tmp_path / 'metrics.csv'
  manager = fl.simulation.CSVMetricsManager(path)
  manager.release({'a': 1, 'b': 2}, 1)
  manager.release({'a': 3, 'b': 4}, 2)
  with open(path, 'a') as f:
    f.write('3,5')  # killed mid-row
  resumed = fl.simulation.CSVMetricsManager(path)
  resumed.clear_metrics(3)
  assert _text(path) == 'round_num,a,b\r\n1,1,2\r\n2,3,4\r\n'


def test_jsonl_release_clear_and_partial_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  manager = fl.simulation.JSONLMetricsManager(path)
  _release_sequence(manager)
  lines = [json.loads(line) for line in _text(path).splitlines()]
  assert lines == [
    {'round_num': 0, 'evaluation/accuracy': 0.25},
    {'round_num': 1, 'train/loss': 1.5},
    {'round_num': 2, 'train/loss': 1.25, 'evaluation/accuracy': 0.5, 'extra': 3},
    {'round_num': 3, 'train/loss': 1.0},
  ]
  assert fl.simulation.load_metrics(path) == {
    line.pop('round_num'): line for line in [dict(x) for x in lines]
  }
  with open(path, 'a') as f:
    f.write('{"round_num": 4, "train/lo')  # killed mid-line
  resumed = fl.simulation.JSONLMetricsManager(path)
  resumed.clear_metrics(2)
  assert [json.loads(line) for line in _text(path).splitlines()] == lines[:2]
  manager.release({'loss': float('nan')}, 2)
  assert np.isnan(fl.simulation.load_metrics(path)[2]['loss'])


def test_in_memory():
  manager = fl.simulation.InMemoryMetricsManager()
  _release_sequence(manager)
  assert manager.metrics == {
    0: {'evaluation/accuracy': 0.25},
    1: {'train/loss': 1.5},
    2: {'train/loss': 1.25, 'evaluation/accuracy': 0.5, 'extra': 3},
    3: {'train/loss': 1.0},
  }
  manager.clear_metrics(1)
  assert manager.metrics == {0: {'evaluation/accuracy': 0.25}}


@pytest.mark.parametrize(
  'manager_fn',
  [
    lambda tmp: fl.simulation.CSVMetricsManager(tmp / 'm.csv'),
    lambda tmp: fl.simulation.JSONLMetricsManager(tmp / 'm.jsonl'),
    lambda tmp: fl.simulation.InMemoryMetricsManager(),
  ],
)
def test_bad_releases(tmp_path, manager_fn):
  manager = manager_fn(tmp_path)
  with pytest.raises(ValueError, match='round_num must be an int >= 0; got -1'):
    manager.release({'a': 1}, -1)
  if not isinstance(manager, fl.simulation.InMemoryMetricsManager):
    with pytest.raises(ValueError, match="top-level 'round_num' key"):
      manager.release({'round_num': 1}, 1)


def _read_events(path):
  """(step, tag, value) scalars and purge steps of a TFRecord event file, framing checked."""
  from tensorboardX.proto import event_pb2

  data = pathlib.Path(path).read_bytes()
  offset, records = 0, []
  while offset < len(data):
    (length,) = struct.unpack_from('<Q', data, offset)
    assert offset + 12 + length + 4 <= len(data)
    records.append(data[offset + 12 : offset + 12 + length])
    offset += 12 + length + 4
  assert offset == len(data)
  scalars, purges = [], []
  for record in records:
    event = event_pb2.Event.FromString(record)
    if event.HasField('session_log') and event.session_log.status == event.session_log.START:
      purges.append(event.step)
    for value in event.summary.value:
      scalars.append((event.step, value.tag, value.simple_value))
  return scalars, purges


def _tensorboard_view(log_dir):
  """What TensorBoard shows: files in order, a purge step hides earlier events at steps >= it."""
  shown = []
  for path in sorted(glob.glob(str(log_dir / 'events.out.tfevents.*')), key=lambda p: p):
    scalars, purges = _read_events(path)
    for step in purges:
      shown = [s for s in shown if s[0] < step]
    shown += scalars
  return sorted(shown)


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
  manager = fl.simulation.TensorBoardMetricsManager(tmp_path)
  manager.clear_metrics(0)
  _release_sequence(manager)
  manager.release({'name': 'skipped: not a number'}, 4)
  manager.close()
  expected = [
    (0, 'evaluation/accuracy', 0.25),
    (1, 'train/loss', 1.5),
    (2, 'evaluation/accuracy', 0.5),
    (2, 'extra', 3.0),
    (2, 'train/loss', 1.25),
    (3, 'train/loss', 1.0),
  ]
  assert _tensorboard_view(tmp_path) == expected
  resumed = fl.simulation.TensorBoardMetricsManager(tmp_path)
  resumed.clear_metrics(2)
  resumed.release({'train': {'loss': 0.75}}, 2)
  resumed.close()
  assert len(glob.glob(str(tmp_path / 'events.out.tfevents.*'))) == 2
  assert _tensorboard_view(tmp_path) == [*expected[:2], (2, 'train/loss', 0.75)]
