"""run_training_process: schedules, metrics, kill-and-resume (in process and a killed process)."""

import csv
import io
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import numpy_reference as ref
import pytest
import simulation_problem as sp
from rich.console import Console

import fedjax_lite as fl
from fedjax_lite.simulation import _progress


@pytest.fixture(scope='module')
def problem():
  return sp.make_problem()  # one process for the module: compiled once


def _weights(process, state):
  return [np.asarray(x) for x in jax.tree.leaves(process.get_model_weights(state))]


def _assert_bitwise(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b, strict=True):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(x, y)


def _csv_without_timing(path):
  """Header and rows as written (strings), timing columns removed."""
  rows = list(csv.reader(io.StringIO(pathlib.Path(path).read_bytes().decode(), newline='')))
  keep = [i for i, name in enumerate(rows[0]) if not name.startswith('timing/')]
  return [[row[i] for i in keep] for row in rows]


def _jsonl_rows(path):
  """(key, value) lists in written order, timing keys removed."""
  return [
    [(k, v) for k, v in json.loads(line).items() if not k.startswith('timing/')]
    for line in pathlib.Path(path).read_text().splitlines()
  ]


def _assert_same_metric_files(run_dir, reference_dir):
  """CSV and JSONL files equal as written, but for the timing values."""
  for name, read in [('metrics.csv', _csv_without_timing), ('metrics.jsonl', _jsonl_rows)]:
    assert read(run_dir / name) == read(reference_dir / name)


class _CrashAt(fl.simulation.MetricsManager):
  """Raises from release at one round, once: an interrupted run."""

  def __init__(self, round_num):
    self.round_num = round_num

  def release(self, metrics, round_num):
    if round_num == self.round_num:
      self.round_num = None
      raise RuntimeError(f'simulated crash at round {round_num}')


def test_matches_a_plain_loop_with_exact_schedules(problem, tmp_path):
  process, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem
  evaluated = []

  def recording_selection_fn(round_num):
    evaluated.append(round_num)
    return evaluation_selection_fn(round_num)

  memory = fl.simulation.InMemoryMetricsManager()
  checkpoints = fl.simulation.FileCheckpointManager(tmp_path, keep=None)
  state = fl.simulation.run_training_process(
    process,
    training_selection_fn,
    7,
    evaluation_fn=evaluation_fn,
    evaluation_selection_fn=recording_selection_fn,
    rounds_per_evaluation=3,
    checkpoint_manager=checkpoints,
    rounds_per_checkpoint=3,
    metrics_managers=[memory],
  )
  assert evaluated == [0, 3, 6, 7]  # the initial state, every 3rd round and the last
  assert checkpoints.checkpoint_rounds() == [0, 3, 6, 7]
  assert sorted(memory.metrics) == list(range(8))
  assert [r for r, m in memory.metrics.items() if 'evaluation/accuracy' in m] == [0, 3, 6, 7]
  assert set(memory.metrics[0]) == {
    'evaluation/loss',
    'evaluation/accuracy',
    'evaluation/num_examples',
    'timing/evaluation_seconds',
  }
  timing_keys = {
    'timing/data_seconds',
    'timing/train_seconds',
    'timing/examples_per_second',
    'timing/round_seconds',
  }

  expected = process.initialize()
  structure = jax.eval_shape(process.initialize)
  for round_num in range(1, 8):
    expected, metrics = process.next(expected, training_selection_fn(round_num))
    got = memory.metrics[round_num]
    process_keys = [k for k in got if not k.startswith(('timing/', 'evaluation/', 'layout/'))]
    assert {k: got[k] for k in process_keys} == fl.simulation.flatten_metrics(metrics)
    # The chunk its 3 clients ran in (the default 8, capped by the cohort); the time to choose
    # it in the first round (here, with tuning off, only looked up).
    assert got['layout/client_chunk_size'] == 3
    assert ('timing/tuning_seconds' in got) == (round_num == 1)
    is_eval = round_num in (3, 6, 7)
    layout_keys = {'layout/client_chunk_size', 'timing/tuning_seconds'}
    assert set(got) - set(process_keys) - timing_keys - layout_keys == (
      {
        'evaluation/loss',
        'evaluation/accuracy',
        'evaluation/num_examples',
        'timing/evaluation_seconds',
      }
      if is_eval
      else set()
    )
    np.testing.assert_allclose(
      got['timing/examples_per_second'],
      got['client_work/train/num_examples'] / got['timing/train_seconds'],
    )
    np.testing.assert_allclose(
      got['timing/round_seconds'],
      got['timing/data_seconds']
      + got['timing/train_seconds']
      + got.get('timing/evaluation_seconds', 0.0),
    )
    if is_eval:
      evaluation = fl.simulation.flatten_metrics(
        evaluation_fn(expected, evaluation_selection_fn(round_num))
      )
      assert {k: got[f'evaluation/{k}'] for k in evaluation} == evaluation
    if round_num in (3, 6):
      _assert_bitwise(
        _weights(process, checkpoints.load_checkpoint(structure, round_num)),
        _weights(process, expected),
      )
  _assert_bitwise(_weights(process, state), _weights(process, expected))


@pytest.mark.parametrize(
  ('rounds_per_checkpoint', 'damage_latest', 'resumed_from'),
  [(1, False, 3), (2, False, 2), (1, True, 2)],
)
def test_kill_and_resume_equals_an_uninterrupted_run(
  problem, tmp_path, rounds_per_checkpoint, damage_latest, resumed_from
):
  total = 6
  reference = sp.run_experiment(
    problem, tmp_path / 'reference', total, rounds_per_checkpoint=rounds_per_checkpoint
  )
  run_dir = tmp_path / 'run'
  # The crash comes after round 4's metrics were written (CSV, JSONL) and before its checkpoint.
  with pytest.raises(RuntimeError, match='simulated crash at round 4'):
    sp.run_experiment(
      problem,
      run_dir,
      total,
      extra_managers=[_CrashAt(4)],
      rounds_per_checkpoint=rounds_per_checkpoint,
    )
  assert list(fl.simulation.load_metrics(run_dir / 'metrics.jsonl')) == [0, 1, 2, 3, 4]
  if damage_latest:
    latest = run_dir / 'checkpoints' / 'ckpt_3.msgpack'
    latest.write_bytes(latest.read_bytes()[:100])
  ran = []

  def recording_selection_fn(round_num):
    ran.append(round_num)
    return problem[1](round_num)

  def resume():
    return sp.run_experiment(
      problem,
      run_dir,
      total,
      selection_fn=recording_selection_fn,
      rounds_per_checkpoint=rounds_per_checkpoint,
    )

  if damage_latest:
    with pytest.warns(RuntimeWarning, match=r'ckpt_3\.msgpack is unreadable'):
      state = resume()
  else:
    state = resume()
  assert ran == list(range(resumed_from + 1, total + 1))
  process = problem[0]
  _assert_bitwise(_weights(process, state), _weights(process, reference))
  _assert_same_metric_files(run_dir, tmp_path / 'reference')
  assert list(fl.simulation.load_metrics(run_dir / 'metrics.jsonl')) == list(range(total + 1))
  manager = fl.simulation.FileCheckpointManager(run_dir / 'checkpoints')
  assert manager.checkpoint_rounds()[-1] == total
  # Rerunning a finished run trains nothing and returns the final state.
  ran.clear()
  again = sp.run_experiment(problem, run_dir, total, selection_fn=recording_selection_fn)
  assert ran == []
  _assert_bitwise(_weights(process, again), _weights(process, reference))


def test_subprocess_killed_then_rerun_equals_an_uninterrupted_run(problem, tmp_path):
  total = 8
  reference = sp.run_experiment(problem, tmp_path / 'reference', total)
  run_dir = tmp_path / 'run'
  here = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join([here, os.path.dirname(here), env.get('PYTHONPATH', '')])
  # The rerun loads the killed run's compiled round from JAX's persistent cache (~2x faster).
  env['JAX_COMPILATION_CACHE_DIR'] = str(tmp_path / 'jax_cache')
  env['JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS'] = '0'
  env['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '0'
  command = [sys.executable, os.path.join(here, 'kill_resume_script.py'), str(run_dir), str(total)]
  child = subprocess.Popen([*command, '0.25'], env=env, stderr=subprocess.PIPE)
  checkpoints = fl.simulation.FileCheckpointManager(run_dir / 'checkpoints')
  deadline = time.monotonic() + 120
  while not checkpoints.checkpoint_rounds() or checkpoints.checkpoint_rounds()[-1] < 3:
    assert child.poll() is None, child.stderr.read().decode()
    assert time.monotonic() < deadline
    time.sleep(0.02)
  os.kill(child.pid, signal.SIGKILL)
  child.wait()
  child.stderr.close()
  assert child.returncode == -signal.SIGKILL
  assert not (run_dir / 'final.npz').exists()
  killed_at = checkpoints.checkpoint_rounds()[-1]
  assert 3 <= killed_at < total
  subprocess.run([*command, '0'], env=env, check=True, capture_output=True)
  with np.load(run_dir / 'final.npz') as final:
    final_weights = [final[f'arr_{i}'] for i in range(len(final.files))]
  _assert_bitwise(final_weights, _weights(problem[0], reference))
  _assert_same_metric_files(run_dir, tmp_path / 'reference')


def test_resume_refuses_a_different_process_or_a_finished_longer_run(problem, tmp_path):
  sp.run_experiment(problem, tmp_path, 3)
  other_model = ref.linear_model(5, 4)  # 4 classes: w is [5, 4], not [5, 3]
  other = fl.algorithms.build_weighted_fed_avg(other_model, fl.optimizers.build_sgdm(0.1))
  with pytest.raises(ValueError, match=r"global_model_weights\.trainable\['b'\] is float32\[3\]"):
    fl.simulation.run_training_process(
      other,
      problem[1],
      3,
      checkpoint_manager=fl.simulation.FileCheckpointManager(tmp_path / 'checkpoints'),
    )
  with pytest.raises(ValueError, match='the latest checkpoint is of round 3, past total_rounds=2'):
    sp.run_experiment(problem, tmp_path, 2)


def test_bad_arguments(problem):
  process, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem
  run = fl.simulation.run_training_process
  for bad in [0, 1.5, True, '3']:
    with pytest.raises(ValueError, match=f'total_rounds must be an int >= 1; got {bad!r}'):
      run(process, training_selection_fn, bad)
  with pytest.raises(ValueError, match='rounds_per_evaluation must be an int >= 1; got 0'):
    run(process, training_selection_fn, 2, rounds_per_evaluation=0)
  with pytest.raises(ValueError, match='rounds_per_checkpoint must be an int >= 1; got -1'):
    run(process, training_selection_fn, 2, rounds_per_checkpoint=-1)
  with pytest.raises(TypeError, match='training_selection_fn must be callable'):
    run(process, [1, 2], 2)
  with pytest.raises(TypeError, match=r'process must have a callable \.initialize'):
    run(object(), training_selection_fn, 2)
  with pytest.raises(ValueError, match='evaluation_fn and evaluation_selection_fn go together'):
    run(process, training_selection_fn, 2, evaluation_fn=evaluation_fn)
  with pytest.raises(TypeError, match=r'metrics_managers\[1\] must have a callable release'):
    run(process, training_selection_fn, 2, metrics_managers=[_CrashAt(9), object()])
  with pytest.raises(TypeError, match='evaluation_fn must return a mapping'):
    run(
      process,
      training_selection_fn,
      1,
      evaluation_fn=lambda state, data: 0.5,
      evaluation_selection_fn=evaluation_selection_fn,
    )


def test_progress_bar_only_on_a_terminal(problem, capsys):
  fl.simulation.run_training_process(problem[0], problem[1], 1, progress=True)
  assert capsys.readouterr().out == ''  # pytest's stdout is not a terminal
  buffer = io.StringIO()
  console = Console(file=buffer, force_terminal=True, width=150)
  bar = _progress.RoundProgress(3, 2, enabled=True, console=console)
  bar.update(2, {'client_work/train/loss': 0.75, 'client_work/train/accuracy': 0.5})
  bar.update(3, {'client_work/train/loss': 0.5, 'evaluation/accuracy': 0.875})
  bar.close()
  text = buffer.getvalue()
  assert 'round 3/3' in text
  assert 'loss 0.5000' in text and 'eval acc 0.8750' in text and 'rounds/s' in text
  assert not _progress.RoundProgress(3, 1, enabled=False, console=console).enabled


class _Accountant:
  """ε grows by 0.5 a round (a stand-in with a readable schedule)."""

  def epsilon(self, rounds):
    return 0.5 * rounds


def test_epsilon_is_released_every_round_and_the_budget_stops_the_run(problem, tmp_path):
  process, selection_fn, _, _ = problem
  manager = fl.simulation.InMemoryMetricsManager()
  checkpoints = fl.simulation.FileCheckpointManager(tmp_path, keep=10)
  state = fl.simulation.run_training_process(
    process,
    selection_fn,
    10,
    metrics_managers=[manager],
    checkpoint_manager=checkpoints,
    rounds_per_checkpoint=4,
    privacy_accountant=_Accountant(),
    epsilon_budget=2.6,
  )
  rounds = sorted(manager.metrics)
  assert rounds == [1, 2, 3, 4, 5]  # round 6 would reach ε = 3.0 > 2.6
  assert [manager.metrics[r]['privacy/epsilon'] for r in rounds] == [0.5, 1.0, 1.5, 2.0, 2.5]
  restored, round_num = checkpoints.load_latest_checkpoint(jax.eval_shape(process.initialize))
  assert round_num == 5  # the last round run is checkpointed although 5 % 4 != 0
  _assert_bitwise(_weights(process, restored), _weights(process, state))


def test_a_budget_stop_ends_like_a_finished_run(problem, tmp_path):
  """The last round the budget allows is evaluated and checkpointed, and that checkpoint is kept
  as a finished run's is; rerunning with the same budget trains nothing more."""
  process, selection_fn, evaluation_fn, evaluation_selection_fn = problem
  manager = fl.simulation.InMemoryMetricsManager()
  checkpoints = fl.simulation.FileCheckpointManager(tmp_path, keep=2)

  def run(total_rounds, budget=2.6):
    return fl.simulation.run_training_process(
      process,
      selection_fn,
      total_rounds,
      evaluation_fn=evaluation_fn,
      evaluation_selection_fn=evaluation_selection_fn,
      rounds_per_evaluation=4,
      metrics_managers=[manager],
      checkpoint_manager=checkpoints,
      privacy_accountant=_Accountant(),
      epsilon_budget=budget,
    )

  state = run(10)
  assert sorted(manager.metrics) == [0, 1, 2, 3, 4, 5]
  assert [r for r, m in sorted(manager.metrics.items()) if 'evaluation/loss' in m] == [0, 4, 5]
  final = evaluation_fn(state, evaluation_selection_fn(5))
  assert manager.metrics[5]['evaluation/loss'] == pytest.approx(float(final['loss']))
  assert os.path.exists(tmp_path / 'ckpt_5.kept')
  # The same budget again: nothing to run. A larger one extends the run; round 5 stays.
  run(10)
  assert max(manager.metrics) == 5 and checkpoints.checkpoint_rounds() == [4, 5]
  run(10, budget=4.2)
  assert max(manager.metrics) == 8
  assert checkpoints.checkpoint_rounds() == [5, 7, 8]  # 5 kept, keep=2 of the others


def test_a_budget_below_one_round_is_refused_before_anything_runs(problem, tmp_path):
  process, selection_fn, _, _ = problem
  checkpoints = fl.simulation.FileCheckpointManager(tmp_path / 'ckpt')
  with pytest.raises(
    ValueError, match=r'epsilon_budget=0.4 is below the epsilon of one round \(0\.5\)'
  ):
    fl.simulation.run_training_process(
      process,
      selection_fn,
      10,
      checkpoint_manager=checkpoints,
      privacy_accountant=_Accountant(),
      epsilon_budget=0.4,
    )
  assert checkpoints.checkpoint_rounds() == []


def test_privacy_arguments_are_checked(problem):
  process, selection_fn, _, _ = problem
  with pytest.raises(ValueError, match='epsilon_budget needs a privacy_accountant'):
    fl.simulation.run_training_process(process, selection_fn, 1, epsilon_budget=1.0)
  with pytest.raises(TypeError, match=r'privacy_accountant must have a callable \.epsilon'):
    fl.simulation.run_training_process(process, selection_fn, 1, privacy_accountant=object())
  with pytest.raises(ValueError, match='epsilon_budget must be a number > 0'):
    fl.simulation.run_training_process(
      process, selection_fn, 1, privacy_accountant=_Accountant(), epsilon_budget=-1
    )


def test_the_driver_donates_each_state_to_the_round_that_replaces_it(problem):
  process, training_selection_fn, _, _ = problem
  given = []

  def initialize():
    given.append(process.initialize())
    return given[-1]

  recorded = process._replace(initialize=initialize)
  donated = fl.simulation.run_training_process(recorded, training_selection_fn, 2)
  kept = fl.simulation.run_training_process(recorded, training_selection_fn, 2, donate_state=False)
  _assert_bitwise(_weights(process, donated), _weights(process, kept))
  # The initial state's buffers went to round 1 (one copy of the state per round, not two);
  # without donation they stay readable.
  assert all(leaf.is_deleted() for leaf in jax.tree.leaves(given[0]))
  assert not any(leaf.is_deleted() for leaf in jax.tree.leaves(given[1]))


@pytest.mark.parametrize('donate_state', [True, False])
def test_the_driver_checks_labels_before_its_donated_round(problem, donate_state):
  """The driver re-jits `next` to donate the state; the model's label check still runs."""
  process, training_selection_fn, _, _ = problem

  def bad_labels(round_num):
    data = training_selection_fn(round_num)
    y = np.array(data.batch['y'])
    y[0, 0, 0] = 3  # the linear model has 3 classes: labels 0..2
    return data._replace(batch={**data.batch, 'y': y})

  with pytest.raises(ValueError, match='label'):
    fl.simulation.run_training_process(process, bad_labels, 1, donate_state=donate_state)
