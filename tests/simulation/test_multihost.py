"""Multi-process runs (`fedjax-lite train --processes N`): every process holds the one-process
weights, a resumed run continues from process 0's checkpoint, and stopping the launcher (or
losing a process) stops the whole run promptly."""

import contextlib
import json
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import time

import multihost_worker
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec

import fedjax_lite as fl
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


def _rows(out):
  """A run's metrics by round, without those that describe its speed (timing, lanes)."""
  rows = [json.loads(line) for line in (out / 'metrics.jsonl').read_text().splitlines()]
  return {
    r['round_num']: {k: v for k, v in r.items() if not k.startswith(('timing/', 'layout/'))}
    for r in rows
  }


def _client_states(path):
  """`{client key: (round committed, state bytes as float32)}` of a client state file."""
  with contextlib.closing(sqlite3.connect(path)) as db:
    rows = db.execute('SELECT key, version, value FROM states').fetchall()
  return {key: (version, np.frombuffer(value, np.float32)) for key, version, value in rows}


def test_the_primary_store_pads_places_and_drops_the_padding_in_one_process():
  # The test process's devices (8, or 1 once this file's fixture started JAX): a cohort of 5 is
  # padded to a multiple of them.
  mesh = multihost.global_mesh()
  padded = multihost.cohort_block(5, mesh)[2]
  default = {'c': np.zeros(3, np.float32)}
  inner = fl.simulation.InMemoryClientStateStore(default)
  store = multihost.PrimaryClientStateStore(lambda: inner, default, 5, mesh)
  assert store.store is inner
  ids = multihost.padded_cohort_ids(['a', 'b', 'c', 'd', 'e'], mesh)
  assert ids == ['a', 'b', 'c', 'd', 'e', *[0] * (padded - 5)]
  states = store.get(ids)
  assert states['c'].shape == (padded, 3)
  clients_axis = NamedSharding(mesh, PartitionSpec(multihost.CLIENTS_AXIS))
  assert states['c'].sharding.is_equivalent_to(clients_axis, 2)  # as the round's data
  store.put(ids, {'c': states['c'] + np.arange(padded, dtype=np.float32)[:, None]})
  assert len(store) == len(inner) == 5  # the padding clients are not stored
  expected = [0, 1, 2, 3, 4, *[0] * (padded - 5)]
  np.testing.assert_array_equal(store.get(ids)['c'][:, 0], expected)
  store.commit(1)
  store.put(ids, {'c': np.ones((padded, 3), np.float32)})
  store.rollback(1)
  np.testing.assert_array_equal(inner.get(['e'])['c'], [[4, 4, 4]])
  with pytest.raises(ValueError, match=f'ids has {padded + 1} ids; a round of 5 clients over '):
    store.get([*ids, 0])
  with pytest.raises(fl.simulation.ClientStateStoreError, match='round 7'):
    store.rollback(7)


@pytest.mark.parametrize(
  ('argv', 'per_process'),
  [
    (['--clients-per-round', '98'], 49),
    (['--clients-per-round', '99'], None),  # 50 a process: the rule's threshold
    (['--clients-per-round', '150', '--processes', '3'], None),
    (['--clients-per-round', '10', '--processes', '3'], 4),
    (['--clients-per-round', 'ten'], None),  # refused: the processes say why
  ],
)
def test_the_note_names_the_clients_per_process_below_the_threshold(tmp_path, argv, per_process):
  args = cli.build_parser().parse_args(['train', '--out', str(tmp_path), '--processes', '2', *argv])
  note = cli._small_cohort_note(args)
  assert cli.MIN_CLIENTS_PER_PROCESS == 50
  if per_process is None:
    assert note is None
  else:
    assert note.startswith(f'--processes {args.processes} leaves each process {per_process} of ')


def test_both_processes_hold_the_one_process_weights(tmp_path):
  worker = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')
  assert multihost.launch([sys.executable, worker, str(tmp_path)], 2) == 0
  first, second = (np.load(tmp_path / f'p{rank}.npz') for rank in (0, 1))
  one_process = multihost_worker.train()
  for i, expected in enumerate(one_process):
    np.testing.assert_array_equal(first[f'arr_{i}'], second[f'arr_{i}'])  # identical states
    np.testing.assert_allclose(first[f'arr_{i}'], expected, rtol=1e-6, atol=1e-7)


WORKER = os.path.join(os.path.dirname(__file__), 'multihost_worker.py')


ALGORITHMS = {
  'fedavg': ['--algorithm', 'fedavg'],
  'scaffold': ['--algorithm', 'scaffold'],  # client states: process 0's file
  'mime': ['--algorithm', 'mime', '--client-optimizer', 'sgdm'],  # broadcast optimizer state
}


@pytest.mark.parametrize('algorithm', list(ALGORITHMS))
def test_two_processes_train_as_one_resume_from_process_0_and_compile_once(
  tmp_path, monkeypatch, algorithm
):
  """Two processes, stopped after round 2 (a finished 2-round run) and extended to round 4,
  equal one process's 4 rounds; the other process resumes from process 0's checkpoint (and
  SCAFFOLD from process 0's client states), broadcast. Each process compiles the round once."""
  monkeypatch.chdir(tmp_path)
  args = ['--clients-per-round', '5', '--eval-every', '1', '--quiet', '--model', 'logreg']
  args += ALGORITHMS[algorithm]
  assert cli.main(['train', *args, '--out', 'one', '--rounds', '4']) == 0
  # Before: the state left `initialize` (or the restored checkpoint) on one device and the round
  # returned it replicated over the mesh, so every process compiled the round again at its second
  # round (seconds each). Evaluation, every round here, compiles once too. SCAFFOLD's client
  # states, broadcast by process 0 each round, are placed like the cohort: no compile either, and
  # only process 0 opens the client state file.
  for name, rounds in [('fresh', 2), ('resumed', 4)]:  # rounds 1-2, then 3-4 from round 2
    out = tmp_path / name
    out.mkdir()
    run = [*args, '--out', str(tmp_path / 'two'), '--rounds', str(rounds)]
    assert multihost.launch([sys.executable, WORKER, '--compiles', str(out), *run], 2) == 0
    for rank in (0, 1):
      counts = json.loads((out / f'compiles{rank}.json').read_text())
      files = int(algorithm == 'scaffold' and rank == 0)
      assert counts == {'round': 1, 'evaluation': 1, 'client_state_files': files}, (name, rank)
  one, two = _rows(tmp_path / 'one'), _rows(tmp_path / 'two')
  assert one.keys() == two.keys() == set(range(5))
  # The cohort split over processes sums in another order: measured up to 1.3e-7 (train loss)
  # over these 4 rounds; rtol 1e-5 leaves room for other CPUs' summation orders, and fails on
  # any lost state (e.g. SCAFFOLD's control variates restarted at zero on resume). The gap grows
  # with the rounds (FedAvg's training loss: 3.3e-5 relative by round 6).
  for round_num in one:
    for key, value in one[round_num].items():
      np.testing.assert_allclose(two[round_num][key], value, rtol=1e-5, err_msg=key)
  # Only process 0 wrote: one set of files, one line per round, one lock.
  stateful = [cli.CLIENT_STATES_FILE] if algorithm == 'scaffold' else []
  assert sorted(os.listdir(tmp_path / 'two')) == sorted(
    ['.lock', 'checkpoints', 'config.json', 'metrics.csv', 'metrics.jsonl', *stateful]
  )
  if algorithm != 'scaffold':
    return
  # The same clients' states, committed at the same rounds (measured: up to 6e-7 of the largest).
  one_states = _client_states(tmp_path / 'one' / cli.CLIENT_STATES_FILE)
  two_states = _client_states(tmp_path / 'two' / cli.CLIENT_STATES_FILE)
  assert one_states.keys() == two_states.keys() and one_states
  for key, (version, state) in one_states.items():
    assert two_states[key][0] == version
    np.testing.assert_allclose(two_states[key][1], state, rtol=1e-5, atol=1e-5 * abs(state).max())
  # A client state file that process 0 cannot resume from stops every process with its error
  # (process 1 too, on its own: none is left waiting in a collective to be killed).
  path = tmp_path / 'two' / cli.CLIENT_STATES_FILE
  os.remove(path)
  argv = ['train', *args, '--out', str(tmp_path / 'two'), '--rounds', '5', '--processes', '2']
  result = subprocess.run(
    [sys.executable, '-m', 'fedjax_lite.cli', *argv], capture_output=True, text=True, timeout=300
  )
  assert result.returncode == 2, result.stderr[-2000:]
  error = result.stderr.splitlines()[-1]
  assert error.startswith(f'fedjax-lite train: error: {path} has no client states committed'), error
  assert 'stopped process' not in result.stderr


# A launcher of two `multihost_worker.py --hold` processes, as `fedjax-lite train` launches.
LAUNCHER = """
import sys
from fedjax_lite.simulation import multihost
try:
  sys.exit(multihost.launch(sys.argv[1:], 2, name='fedjax-lite train', stop_timeout=5))
except KeyboardInterrupt:
  print('interrupted', file=sys.stderr)
  sys.exit(130)
"""


def _alive(pid):
  """Whether `pid` runs (a zombie, an ended process nobody reaped yet, does not)."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[0] not in ('Z', 'X')
  except FileNotFoundError:
    return False


def _wait_for(condition, timeout, what):
  deadline = time.monotonic() + timeout
  while not condition():
    if time.monotonic() > deadline:
      pytest.fail(f'no {what} after {timeout} s')
    time.sleep(0.1)


def _kill_left(*pids):
  for pid in pids:
    if _alive(pid):
      os.kill(pid, signal.SIGKILL)


@pytest.fixture
def hold_run(tmp_path):
  """`(launcher, worker_pids, logs_parent)`: two `--hold` processes under a launcher, both
  started (their temporary log folders go under `logs_parent`); all killed after the test."""
  logs_parent = tmp_path / 'tmp'
  logs_parent.mkdir()
  launcher = subprocess.Popen(
    [sys.executable, '-c', LAUNCHER, sys.executable, WORKER, '--hold', str(tmp_path)],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
    env={**os.environ, 'TMPDIR': str(logs_parent)},
  )
  pids = []
  try:
    started = lambda: all((tmp_path / f'pid{r}').exists() for r in (0, 1))
    _wait_for(lambda: started() or launcher.poll() is not None, 180, 'processes started')
    assert launcher.poll() is None, launcher.communicate()
    pids = [int((tmp_path / f'pid{r}').read_text()) for r in (0, 1)]
    yield launcher, pids, logs_parent
  finally:
    _kill_left(launcher.pid, *pids)
    launcher.communicate()


def test_a_dead_process_stops_the_run_at_once_with_one_line_naming_it(hold_run):
  launcher, pids, logs_parent = hold_run
  os.kill(pids[1], signal.SIGKILL)
  started = time.monotonic()
  stdout, stderr = launcher.communicate(timeout=60)
  # Before: the launcher waited ~84 s for process 0, which then printed ~100 lines of C++ log.
  assert time.monotonic() - started < 20
  assert launcher.returncode == 128 + signal.SIGKILL
  lines = stderr.splitlines()
  assert len(lines) == 1, stderr  # no traceback from process 0, whose collective failed
  match = re.fullmatch(
    r'fedjax-lite train: error: process 1 of 2 was killed by SIGKILL'
    r'(; stopped process 0)? \(logs: (.+)\)',
    lines[0],
  )
  assert match, lines[0]
  assert os.path.dirname(match[2]) == str(logs_parent)  # kept, since a process failed
  assert sorted(os.listdir(match[2])) == ['process-0.log', 'process-1.log']
  assert stdout == ''
  assert not _alive(pids[0])


@pytest.mark.parametrize('sig', [signal.SIGTERM, signal.SIGKILL], ids=['SIGTERM', 'SIGKILL'])
def test_a_stopped_launcher_leaves_no_process(hold_run, sig):
  launcher, pids, logs_parent = hold_run
  launcher.send_signal(sig)
  _, stderr = launcher.communicate(timeout=60)
  if sig == signal.SIGTERM:  # passed on as SIGINT; those stuck in a collective killed after 5 s
    assert (launcher.returncode, stderr) == (130, 'interrupted\n')
    assert not any(_alive(pid) for pid in pids)
    assert os.listdir(logs_parent) == []  # nothing failed: the logs are gone
  else:  # before: the processes went on; now they see the launcher's pipe close
    _wait_for(lambda: not any(_alive(pid) for pid in pids), 30, 'processes ended')


def _checkpoint_rounds(out):
  names = os.listdir(out / 'checkpoints') if (out / 'checkpoints').is_dir() else []
  return [int(m[1]) for m in map(re.compile(r'ckpt_(\d+)\.').match, names) if m]


def _children(pid):
  children = []
  for task in os.listdir(f'/proc/{pid}/task'):
    with open(f'/proc/{pid}/task/{task}/children') as f:
      children += [int(child) for child in f.read().split()]
  return children


def test_ctrl_c_stops_every_process_and_a_resume_continues(tmp_path, capsys):
  out = tmp_path / 'run'
  argv = ['train', '--clients-per-round', '5', '--eval-every', '1000', '--out', str(out)]
  launcher = subprocess.Popen(
    [sys.executable, '-m', 'fedjax_lite.cli', *argv, '--rounds', '1000', '--processes', '2'],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    text=True,
  )
  workers = []
  try:
    trained = lambda: max(_checkpoint_rounds(out), default=0) >= 2
    _wait_for(lambda: trained() or launcher.poll() is not None, 240, 'round 2 checkpoint')
    workers = _children(launcher.pid)
    assert len(workers) == 2
    launcher.send_signal(signal.SIGINT)  # the launcher alone, as a terminal's Ctrl-C now
    stdout, stderr = launcher.communicate(timeout=60)
  finally:
    _kill_left(launcher.pid, *workers)
  # Before: the launcher waited while its processes trained all 1,000 rounds.
  assert launcher.returncode == 130
  lines = stderr.splitlines()  # the note of a small cohort, then why it stopped
  assert len(lines) == 2 and lines[0].startswith('fedjax-lite train: note: '), stderr
  assert lines[1] == 'fedjax-lite train: interrupted'
  assert not any(_alive(pid) for pid in workers)
  assert '[Gloo]' not in stdout
  last = max(_checkpoint_rounds(out))
  assert last < 1000
  # Resumed here, in one process (a few seconds; the checkpoint is the same either way).
  capsys.readouterr()
  assert cli.main([*argv, '--rounds', str(last + 1)]) == 0
  assert f'resuming after round {last}' in capsys.readouterr().out
  assert max(_rows(out)) == last + 1


def test_native_output_leaves_stdout_without_a_launcher():
  # `fedjax-lite train --distributed` on each machine: gloo's banner (C++, on descriptor 1) goes
  # to stderr; what Python prints stays on stdout.
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  program = (
    'import os\n'
    'from fedjax_lite.simulation import multihost\n'
    f'multihost.initialize("127.0.0.1:{port}", 1, 0)\n'
    'os.write(1, b"[Gloo] native\\n")\n'
    'print("python")\n'
  )
  result = subprocess.run(
    [sys.executable, '-c', program], capture_output=True, text=True, timeout=120
  )
  assert result.returncode == 0, result.stderr
  assert result.stdout == 'python\n'
  assert '[Gloo] native' in result.stderr
