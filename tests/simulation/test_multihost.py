"""Multi-process runs (`fedjax-lite train --processes N`): every process holds the one-process
weights, and a resumed run continues from process 0's checkpoint."""

import json
import os
import subprocess
import sys

import multihost_worker
import numpy as np
import pytest

from fedjax_lite import cli
from fedjax_lite.simulation import multihost

pytestmark = pytest.mark.skipif(
  not hasattr(os, 'sched_getaffinity') or len(os.sched_getaffinity(0)) < 2,
  reason='needs 2 cores for 2 processes',
)


@pytest.fixture(autouse=True)
def _one_device_per_process(monkeypatch):
  """The spawned processes get one CPU device each (conftest forces 8 on the test process)."""
  monkeypatch.setenv('XLA_FLAGS', '')


ARGS = ['--rounds', '4', '--clients-per-round', '5', '--eval-every', '2', '--quiet']


def _train(out, *extra, processes=2):
  argv = ['train', *ARGS, '--out', str(out), '--processes', str(processes), *extra]
  result = subprocess.run(
    [sys.executable, '-m', 'fedjax_lite.cli', *argv], capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 0, result.stderr[-2000:]
  return result.stdout


def _rows(out):
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  return {r['round_num']: {k: v for k, v in r.items() if not k.startswith('timing/')} for r in rows}


def test_two_processes_train_as_one_and_resume_from_process_0(tmp_path, monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  assert cli.main(['train', *ARGS, '--out', 'one']) == 0
  # Two processes stopped after round 2 (a finished 2-round run), then extended to round 4:
  # the other process resumes from process 0's checkpoint, broadcast.
  _train(tmp_path / 'two', '--rounds', '2')
  _train(tmp_path / 'two')
  one, two = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
  assert one.keys() == two.keys() == {0, 1, 2, 3, 4}
  for round_num in one:  # the cohort split over processes sums in another order: ~1e-7
    for key, value in one[round_num].items():
      np.testing.assert_allclose(two[round_num][key], value, rtol=1e-5, err_msg=key)
  # Only process 0 wrote: one set of files, one line per round, one lock.
  assert sorted(os.listdir(tmp_path / 'two')) == [
    '.lock',
    'checkpoints',
    'config.json',
    'metrics.csv',
    'metrics.jsonl',
  ]


def test_both_processes_hold_the_one_process_weights(tmp_path):
  worker = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
  assert multihost.launch([sys.executable, worker, str(tmp_path)], 2) == 0
  first, second = (np.load(tmp_path / f'p{rank}.npz') for rank in (0, 1))
  one_process = multihost_worker.train()
  for i, expected in enumerate(one_process):
    np.testing.assert_array_equal(first[f'arr_{i}'], second[f'arr_{i}'])  # identical states
    np.testing.assert_allclose(first[f'arr_{i}'], expected, rtol=1e-6, atol=1e-7)
