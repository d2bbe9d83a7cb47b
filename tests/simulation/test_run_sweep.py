"""run_sweep: one ordinary run folder per run, equal to separate runs; a killed sweep resumes
bitwise."""

import json
import os

import jax
import numpy as np
import numpy_reference as ref
import pytest
import simulation_problem as sp
from test_training_loop import _assert_bitwise, _assert_same_metric_files, _CrashAt

import fedjax_lite as fl

RUNS = [
  fl.templates.SweepRun(seed, {'client_work': {'learning_rate': lr}})
  for lr in (0.05, 0.2)
  for seed in (0, 1)
]


def process_fn(seed):
  model = ref.linear_model(5, 3, seed)
  return fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), seed=seed
  )


@pytest.fixture(scope='module')
def problem():
  """(sweep, training_selection_fn, evaluation_fn, evaluation_selection_fn); one compile."""
  sweep = fl.templates.build_sweep(process_fn, RUNS)
  _, training_selection_fn, _, evaluation_selection_fn = sp.make_problem()
  evaluation_fn = fl.simulation.build_evaluation_fn(
    sweep.process, fl.algorithms.build_fed_eval(ref.linear_model(5, 3))
  )
  return sweep, training_selection_fn, evaluation_fn, evaluation_selection_fn


def run(problem, root, total_rounds, extra_managers=None, selection_fn=None, **kwargs):
  sweep, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem

  def managers(run_dir):
    extra = [] if extra_managers is None else extra_managers.get(os.path.basename(run_dir), [])
    return [*fl.simulation._sweep.default_metrics_managers(run_dir), *extra]

  return fl.simulation.run_sweep(
    sweep,
    selection_fn or training_selection_fn,
    total_rounds,
    [root / f'run_{k}' for k in range(len(RUNS))],
    runs_per_program=2,
    evaluation_fn=evaluation_fn,
    evaluation_selection_fn=evaluation_selection_fn,
    rounds_per_evaluation=2,
    metrics_managers_fn=managers,
    **kwargs,
  )


def weights(state):
  return [np.asarray(x) for x in jax.tree.leaves(state.global_model_weights)]


def test_each_run_is_an_ordinary_run_folder_equal_to_a_separate_run(problem, tmp_path):
  states = run(problem, tmp_path, 3)
  _, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem
  for k, sweep_run in enumerate(RUNS):
    run_dir = tmp_path / f'run_{k}'
    assert json.loads((run_dir / 'config.json').read_text()) == {
      'seed': sweep_run.seed,
      'hparams': sweep_run.hparams,
    }
    metrics = fl.simulation.load_metrics(run_dir / 'metrics.jsonl')
    assert list(metrics) == [0, 1, 2, 3]
    assert fl.simulation.load_metrics(run_dir / 'metrics.csv').keys() == metrics.keys()
    assert {'evaluation/loss', 'timing/train_seconds', 'memory/temp_bytes_per_run'} <= set(
      metrics[2]
    )
    assert metrics[2]['memory/temp_bytes_per_run'] > 0
    # The folder is a run of its own: run_training_process extends it from its checkpoint.
    process = process_fn(sweep_run.seed)
    extended = fl.simulation.run_training_process(
      process,
      training_selection_fn,
      5,
      checkpoint_manager=fl.simulation.FileCheckpointManager(run_dir / 'checkpoints'),
    )
    separate = [process.set_hparams(process.initialize(), sweep_run.hparams)]
    for round_num in range(1, 6):
      separate.append(process.next(separate[-1], training_selection_fn(round_num)).state)
    for swept, alone in [(states[k], separate[3]), (extended, separate[5])]:
      for a, b in zip(weights(swept), weights(alone), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    final = evaluation_fn(states[k], evaluation_selection_fn(3))
    assert np.isclose(metrics[3]['evaluation/loss'], final['loss'])


def test_vectorized_evaluation_equals_evaluating_run_by_run(problem, tmp_path):
  run(problem, tmp_path / 'by_run', 3)
  calls = []
  sweep, selection_fn, evaluation_fn, evaluation_selection_fn = problem

  def counted_evaluation_fn(state, data):
    calls.append(1)  # at trace time only: once per group size
    return evaluation_fn(state, data)

  together = (sweep, selection_fn, counted_evaluation_fn, evaluation_selection_fn)
  run(together, tmp_path / 'together', 3, vectorized_evaluation=True)
  assert len(calls) == 1  # one compiled evaluation of each group of 2, rounds 0, 2 and 3
  for k in range(len(RUNS)):
    by_run = fl.simulation.load_metrics(tmp_path / 'by_run' / f'run_{k}' / 'metrics.jsonl')
    rows = fl.simulation.load_metrics(tmp_path / 'together' / f'run_{k}' / 'metrics.jsonl')
    for round_num in (0, 2, 3):
      for key in ('evaluation/loss', 'evaluation/accuracy', 'evaluation/num_examples'):
        np.testing.assert_allclose(rows[round_num][key], by_run[round_num][key], atol=1e-6)
      assert rows[round_num]['timing/evaluation_seconds'] > 0


def test_a_killed_sweep_resumes_bitwise(problem, tmp_path):
  total = 5
  reference = run(problem, tmp_path / 'reference', total)
  root = tmp_path / 'run'
  # Run 2 crashes at round 3 before its checkpoint: its group (runs 2, 3) resumes from round 2,
  # the other group (runs 0, 1) from round 3.
  with pytest.raises(RuntimeError, match='simulated crash at round 3'):
    run(problem, root, total, extra_managers={'run_2': [_CrashAt(3)]})
  checkpoints = [
    fl.simulation.FileCheckpointManager(root / f'run_{k}' / 'checkpoints').checkpoint_rounds()[-1]
    for k in range(len(RUNS))
  ]
  assert checkpoints == [3, 3, 2, 2]
  asked = []

  def recording_selection_fn(round_num):
    asked.append(round_num)
    return problem[1](round_num)

  states = run(problem, root, total, selection_fn=recording_selection_fn)
  assert asked == [3, 4, 5]
  for k in range(len(RUNS)):
    _assert_bitwise(weights(states[k]), weights(reference[k]))
    _assert_same_metric_files(root / f'run_{k}', tmp_path / 'reference' / f'run_{k}')


def test_bad_arguments(problem, tmp_path):
  sweep, training_selection_fn = problem[:2]
  dirs = [tmp_path / f'r{k}' for k in range(4)]
  with pytest.raises(TypeError, match=r'sweep must be a fl\.templates\.Sweep'):
    fl.simulation.run_sweep(None, training_selection_fn, 1, dirs)
  with pytest.raises(ValueError, match='run_dirs must be 4 distinct folders'):
    fl.simulation.run_sweep(sweep, training_selection_fn, 1, dirs[:1] * 4)
  with pytest.raises(ValueError, match='runs_per_program must be an int >= 1'):
    fl.simulation.run_sweep(sweep, training_selection_fn, 1, dirs, runs_per_program=0)
  with pytest.raises(ValueError, match='configs must hold 4 mappings'):
    fl.simulation.run_sweep(sweep, training_selection_fn, 1, dirs, configs=[{}])
  with pytest.raises(TypeError, match=r'must return a ClientBatches or a sequence of 4'):
    fl.simulation.run_sweep(sweep, lambda r: [training_selection_fn(r)], 1, dirs)
  with pytest.raises(ValueError, match=r'per-run client data \[1\] has mask'):
    fl.simulation.stack_client_batches([training_selection_fn(1), problem[3](1)])


@pytest.mark.parametrize('memory', ['device', 'host'])
def test_groups_default_to_what_fits_in_the_free_memory(problem, tmp_path, monkeypatch, memory):
  """An accelerator's free memory bounds a group; a CPU (no device limit) is bounded by the
  host's available memory."""
  sweep, training_selection_fn, _, _ = problem
  sweep_module = fl.simulation._sweep
  assert sweep_module._free_device_bytes() is None  # a CPU reports no device limit
  assert sweep_module._free_host_bytes() > 0  # but the host has a bound
  monkeypatch.setattr(sweep_module, '_free_host_bytes', lambda: None)
  assert sweep_module.runs_that_fit(sweep, training_selection_fn(1)) is None  # nothing known
  # Free memory that holds the round's batches and 2.5 runs (at the headroom).
  one_run = jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((1, *x.shape[1:]), x.dtype), jax.eval_shape(sweep.initialize)
  )
  memory_analysis = sweep.next.lower(one_run, training_selection_fn(1)).compile().memory_analysis()
  state = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(one_run))
  per_run = state + memory_analysis.output_size_in_bytes + memory_analysis.temp_size_in_bytes
  shared = memory_analysis.argument_size_in_bytes - state
  free = (shared + 2.5 * per_run) / sweep_module.MEMORY_HEADROOM
  monkeypatch.setattr(sweep_module, f'_free_{memory}_bytes', lambda: int(free))
  assert sweep_module.runs_that_fit(sweep, training_selection_fn(1)) == 2
  # Per-run cohorts (a sequence, one per run) count once per run: no more runs fit.
  per_run_cohorts = [training_selection_fn(1)] * len(RUNS)
  assert 1 <= sweep_module.runs_that_fit(sweep, per_run_cohorts) <= 2
  # run_sweep without runs_per_program then runs groups of 2: the same states as asked for.
  fitted = fl.simulation.run_sweep(
    sweep, training_selection_fn, 2, [tmp_path / 'fit' / f'run_{k}' for k in range(len(RUNS))]
  )
  compiled = sweep.next._cache_size()
  asked = fl.simulation.run_sweep(
    sweep,
    training_selection_fn,
    2,
    [tmp_path / 'asked' / f'run_{k}' for k in range(len(RUNS))],
    runs_per_program=2,
  )
  assert sweep.next._cache_size() == compiled  # groups of 2 had already been compiled
  for a, b in zip(fitted, asked, strict=True):
    _assert_bitwise(weights(a), weights(b))


class _Accountant:
  """ε grows by `per_round` a round (a stand-in with a readable schedule)."""

  def __init__(self, per_round):
    self.per_round = per_round

  def epsilon(self, rounds):
    return self.per_round * rounds


def _dp_sweep(problem, root, total_rounds, accountant, budget, keep=2):
  """The 4 runs in one program, evaluated every 4 rounds."""
  sweep, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem
  return fl.simulation.run_sweep(
    sweep,
    training_selection_fn,
    total_rounds,
    [root / f'run_{k}' for k in range(len(RUNS))],
    runs_per_program=4,
    evaluation_fn=evaluation_fn,
    evaluation_selection_fn=evaluation_selection_fn,
    rounds_per_evaluation=4,
    keep=keep,
    privacy_accountant=accountant,
    epsilon_budget=budget,
  )


def test_a_dp_sweep_records_epsilon_and_stops_each_run_at_its_budget(problem, tmp_path):
  """Each run stops after the last round within the budget by its own accountant (runs 0, 1
  after round 3, runs 2, 3 after round 6 in the same program), that round evaluated,
  checkpointed and kept; run_training_process on a run folder then agrees (nothing to run)."""
  accountants = [_Accountant(0.5), _Accountant(0.5), _Accountant(0.25), _Accountant(0.25)]
  states = _dp_sweep(problem, tmp_path / 'dp', 8, accountants, 1.6)
  plain = _dp_sweep(problem, tmp_path / 'plain', 6, None, None, keep=None)  # no budget
  process, training_selection_fn, evaluation_fn, evaluation_selection_fn = (
    problem[0].process,
    *problem[1:],
  )
  for k, last in enumerate([3, 3, 6, 6]):
    run_dir = tmp_path / 'dp' / f'run_{k}'
    metrics = fl.simulation.load_metrics(run_dir / 'metrics.jsonl')
    assert list(metrics) == list(range(last + 1))
    assert [metrics[r]['privacy/epsilon'] for r in range(1, last + 1)] == [
      accountants[k].epsilon(r) for r in range(1, last + 1)
    ]
    assert [r for r in metrics if 'evaluation/loss' in metrics[r]] == {3: [0, 3], 6: [0, 4, 6]}[
      last
    ]
    final = evaluation_fn(states[k], evaluation_selection_fn(last))
    assert metrics[last]['evaluation/loss'] == pytest.approx(float(final['loss']))
    checkpoints = fl.simulation.FileCheckpointManager(run_dir / 'checkpoints')
    assert last in checkpoints.checkpoint_rounds()
    assert (run_dir / 'checkpoints' / f'ckpt_{last}.kept').exists()
    # A run stopped early kept its state: the unbudgeted run's state after its last round.
    expected = fl.simulation.FileCheckpointManager(
      tmp_path / 'plain' / f'run_{k}' / 'checkpoints'
    ).load_checkpoint(jax.eval_shape(process.initialize), last)
    _assert_bitwise(weights(states[k]), weights(expected))
    if last == 6:
      _assert_bitwise(weights(states[k]), weights(plain[k]))
    # `train` on the folder (run_training_process with the same budget) runs nothing more.
    alone = fl.simulation.run_training_process(
      process,
      training_selection_fn,
      8,
      checkpoint_manager=checkpoints,
      privacy_accountant=accountants[k],
      epsilon_budget=1.6,
    )
    assert checkpoints.checkpoint_rounds()[-1] == last
    _assert_bitwise(weights(alone), weights(states[k]))


def test_a_dp_sweep_refuses_a_budget_below_one_round(problem, tmp_path):
  with pytest.raises(ValueError, match=r'epsilon_budget=0.4 is below the epsilon of one round'):
    _dp_sweep(problem, tmp_path, 8, _Accountant(0.5), 0.4)
  assert not any(tmp_path.iterdir())  # nothing written
  with pytest.raises(ValueError, match='privacy_accountant must be one accountant or 4'):
    _dp_sweep(problem, tmp_path, 8, [_Accountant(0.5)], 1.0)
  with pytest.raises(ValueError, match='epsilon_budget needs a privacy_accountant'):
    _dp_sweep(problem, tmp_path, 8, None, 1.0)


def _mime_fn(seed):
  model = ref.linear_model(5, 3, seed)
  return fl.algorithms.build_mime(model, fl.optimizers.build_sgdm(0.1, momentum=0.9), seed=seed)


@pytest.mark.parametrize('kind', ['one run', 'sweep group'])
def test_mime_killed_and_resumed_equals_uninterrupted(tmp_path, kind):
  """Mime's server state (the base optimizer's, broadcast to clients) through either driver."""
  _, training_selection_fn, _, evaluation_selection_fn = sp.make_problem()
  if kind == 'one run':
    process = _mime_fn(0)
    evaluation_fn = fl.simulation.build_evaluation_fn(
      process, fl.algorithms.build_fed_eval(ref.linear_model(5, 3))
    )
    problem = (process, training_selection_fn, evaluation_fn, evaluation_selection_fn)
    reference = sp.run_experiment(problem, tmp_path / 'reference', 5)
    with pytest.raises(RuntimeError, match='simulated crash at round 3'):
      sp.run_experiment(problem, tmp_path / 'run', 5, extra_managers=[_CrashAt(3)])
    resumed = sp.run_experiment(problem, tmp_path / 'run', 5)
    _assert_bitwise(weights(resumed), weights(reference))
    _assert_same_metric_files(tmp_path / 'run', tmp_path / 'reference')
    return
  sweep = fl.templates.build_sweep(_mime_fn, RUNS)
  evaluation_fn = fl.simulation.build_evaluation_fn(
    sweep.process, fl.algorithms.build_fed_eval(ref.linear_model(5, 3))
  )
  problem = (sweep, training_selection_fn, evaluation_fn, evaluation_selection_fn)
  reference = run(problem, tmp_path / 'reference', 5)
  with pytest.raises(RuntimeError, match='simulated crash at round 3'):
    run(problem, tmp_path / 'run', 5, extra_managers={'run_2': [_CrashAt(3)]})
  resumed = run(problem, tmp_path / 'run', 5)
  for k in range(len(RUNS)):
    _assert_bitwise(weights(resumed[k]), weights(reference[k]))
    _assert_same_metric_files(tmp_path / 'run' / f'run_{k}', tmp_path / 'reference' / f'run_{k}')


def test_a_label_outside_the_model_classes_stops_the_sweep_naming_the_client(problem, tmp_path):
  def bad_selection_fn(round_num):
    batches = problem[1](round_num)
    labels = np.array(batches.batch['y'])
    labels[1, 0, 0] = 7  # the model predicts 3 classes
    return batches._replace(batch={**batches.batch, 'y': labels})

  with pytest.raises(ValueError, match=r'client 1 of the cohort .* has label 7'):
    run(problem, tmp_path, 2, selection_fn=bad_selection_fn)
