"""The `fedjax-lite` command: train (defaults, config file, resume), eval, datasets, plot."""

import gzip
import json
import os
import pathlib
import re
import runpy
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import _catalogue, _experiment, cli

SMALL = ['--rounds', '4', '--eval-every', '2', '--clients-per-round', '5', '--model', 'logreg']


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _last_metrics(run_dir):
  with open(f'{run_dir}/metrics.jsonl') as f:
    return [json.loads(line) for line in f][-1]


def _checkpoint(run_dir, round_num):
  with open(f'{run_dir}/config.json') as f:
    config = json.load(f)
  process = _experiment.build_experiment(config).process
  manager = fl.simulation.FileCheckpointManager(f'{run_dir}/checkpoints')
  return manager.load_checkpoint(jax.eval_shape(process.initialize), round_num)


def test_train_default_reaches_90_percent_and_writes_the_run(tmp_path, capsys):
  assert cli.main(['train']) == 0
  out = capsys.readouterr().out
  assert re.search(r'round +1 +loss', out)
  accuracy = float(re.search(r'final: .*test accuracy (\d\.\d+)', out).group(1))
  assert accuracy >= 0.90
  run = tmp_path / 'runs' / 'digits-mlp-fedavg'
  last = _last_metrics(run)
  assert last['round_num'] == 30
  assert last['evaluation/accuracy'] == pytest.approx(accuracy, abs=1e-4)
  header = (run / 'metrics.csv').read_text().splitlines()[0].split(',')
  assert {'round_num', 'client_work/train/loss', 'evaluation/accuracy'} <= set(header)
  assert sorted(p.name for p in (run / 'checkpoints').iterdir())[-1] == 'ckpt_30.msgpack'
  # `eval` reproduces the final evaluation from the checkpoint.
  assert cli.main(['eval', str(run)]) == 0
  out = capsys.readouterr().out
  assert 'round 30' in out
  assert float(re.search(r'accuracy ([\d.]+)', out).group(1)) == pytest.approx(accuracy, abs=1e-4)


def test_config_file_and_flags(tmp_path):
  (tmp_path / 'exp.toml').write_text('rounds = 3\nclients-per-round = 4\nmodel = "logreg"\n')
  assert cli.main(['train', '--config', 'exp.toml', '--rounds', '2', '--out', 'r', '--quiet']) == 0
  config = json.loads((tmp_path / 'r' / 'config.json').read_text())
  assert (config['rounds'], config['clients_per_round'], config['model']) == (2, 4, 'logreg')
  assert _last_metrics(tmp_path / 'r')['round_num'] == 2


def test_resumed_run_equals_an_uninterrupted_one(capsys):
  # 'a' stops after round 2 (as if killed), then the same command with more rounds resumes it.
  assert cli.main(['train', *SMALL, '--rounds', '2', '--out', 'a']) == 0
  assert cli.main(['train', *SMALL, '--out', 'a']) == 0
  assert 'resuming after round 2' in capsys.readouterr().out
  assert cli.main(['train', *SMALL, '--out', 'b']) == 0
  resumed, straight = _checkpoint('a', 4), _checkpoint('b', 4)
  for x, y in zip(jax.tree.leaves(resumed), jax.tree.leaves(straight), strict=True):
    np.testing.assert_array_equal(x, y)  # bitwise on CPU
  rows = {}
  for run in ('a', 'b'):
    with open(f'{run}/metrics.jsonl') as f:
      rows[run] = [
        {k: v for k, v in json.loads(line).items() if not k.startswith('timing/')} for line in f
      ]
  assert rows['a'] == rows['b']
  # --resume takes the saved settings; changing one that matters is refused.
  assert cli.main(['train', '--resume', '--out', 'a', '--rounds', '5', '--quiet']) == 0
  assert _last_metrics('a')['round_num'] == 5
  assert cli.main(['train', *SMALL, '--out', 'a', '--client-lr', '0.5']) == 2
  assert 'client_lr: 0.1 -> 0.5' in capsys.readouterr().err


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['train', '--rounds', '0'], '--rounds: expected an int >= 1; got '),
    (['train', '--client-lr', '-1'], '--client-lr: expected a number > 0'),
    (['train', '--clients-per-round', '50'], 'exceeds the 30 training clients'),
    (['train', '--model', 'resnet'], 'expected one of logreg, mlp, cnn, mf'),
    (['train', '--dataset', 'imagenet'], "unknown name 'imagenet'; expected one of digits"),
    (['train', '--model', 'mf'], 'mf and --algorithm fedrecon go together'),
    (['train', '--resume', '--out', 'nowhere'], 'nowhere holds no run to resume'),
    (['train', '--config', 'missing.toml'], "--config: no file 'missing.toml'"),
    (['eval', 'nowhere'], 'nowhere is not a run folder'),
    (['train', '--aggregator', 'dp'], '--aggregator dp needs --noise-multiplier'),
    (['train', '--noise-multiplier', '1'], '--noise-multiplier goes with --aggregator dp'),
    (['train', '--clip', '1', '--aggregator', 'median'], '--clip goes with --aggregator clip'),
    (['train', '--trim-fraction', '0.7'], '--trim-fraction: expected a number in [0, 0.5)'),
    (['train', '--aggregator', 'compression', '--bits', '20'], 'bits must be an int in 1..16'),
    (['train', '--bits', '4'], '--bits goes with --aggregator compression'),
    (['train', '--target-delta', '2'], '--target-delta: expected a number in (0, 1)'),
    (
      ['train', '--aggregator', 'dp', '--noise-multiplier', '1', '--clients-per-round', '5'],
      '--aggregator dp with the adaptive clip (no --clip) needs more than 10 clients a round',
    ),
    (['fly'], 'invalid choice'),
  ],
)
def test_bad_input_exits_nonzero_naming_the_flag(argv, message, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as exit_:
    code = exit_.code
  assert code != 0
  assert message in capsys.readouterr().err


def test_bad_config_keys_and_values(tmp_path, capsys):
  (tmp_path / 'bad.toml').write_text('roundz = 3\n')
  assert cli.main(['train', '--config', 'bad.toml']) == 2
  assert "bad.toml: unknown key 'roundz'; expected one of dataset" in capsys.readouterr().err
  (tmp_path / 'bad.toml').write_text('epochs = "two"\n')
  assert cli.main(['train', '--config', 'bad.toml']) == 2
  assert "bad.toml: epochs: expected an int >= 1; got 'two'" in capsys.readouterr().err


def test_other_models_and_algorithms_train(capsys):
  for i, extra in enumerate(
    [
      ['--model', 'cnn', '--max-steps', '2'],
      ['--algorithm', 'fedsgd', '--server-lr', '0.5'],
      ['--algorithm', 'fedavg_unweighted', '--server-optimizer', 'adam', '--server-lr', '0.01'],
      ['--partition', 'shards', '--client-optimizer', 'sgdm', '--model', 'logreg'],
    ]
  ):
    argv = ['train', *SMALL, '--rounds', '1', '--epochs', '1', '--out', f'run{i}', '--quiet']
    assert cli.main([*argv, *extra]) == 0
    assert re.search(r'final: test accuracy 0\.\d+  test loss \d', capsys.readouterr().out)


@pytest.mark.parametrize(
  'name',
  [  # k-means has no accuracy: tests/test_catalogue.py
    n
    for n, a in _catalogue.ALGORITHMS.items()
    if a.model == 'classifier' and not a.evaluation_model
  ],
)
def test_every_algorithm_of_the_catalogue_trains_from_the_command(name, capsys):
  extra = ['--proximal-strength', '0.5'] if name == 'fedprox' else []
  argv = ['train', *SMALL, '--rounds', '2', '--epochs', '1', '--algorithm', name, '--out', 'run']
  assert cli.main([*argv, *extra]) == 0
  out = capsys.readouterr().out
  assert re.search(r'round +2  loss \d+\.\d{4}  accuracy 0\.\d{4}  test loss', out)
  assert _last_metrics('run')['client_work/train/num_examples'] > 0
  config = json.loads(pathlib.Path('run/config.json').read_text())
  process = _experiment.build_experiment(config).process
  hparams = process.get_hparams(_checkpoint('run', 2))
  if name == 'fedprox':
    assert hparams['client_work']['proximal_strength'] == 0.5
  if name in ('fedadam', 'fedyogi', 'fedadagrad'):  # the algorithm's own default
    assert np.isclose(hparams['finalizer']['learning_rate'], 0.01)
  if 'client_lr' in _catalogue.ALGORITHMS[name].reads:
    assert np.isclose(hparams['client_work']['learning_rate'], 0.1)
  assert cli.main(['train', '--out', 'run', '--rounds', '3', '--quiet']) == 0  # resumes
  assert _last_metrics('run')['round_num'] == 3


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['--algorithm', 'fedsgd', '--client-lr', '0.3'], '--client-lr does not apply to --algorithm'),
    (['--algorithm', 'fedadam', '--server-optimizer', 'sgd'], '--server-optimizer does not apply'),
    (['--proximal-strength', '0.1'], '--proximal-strength does not apply to --algorithm fedavg'),
  ],
)
def test_settings_an_algorithm_does_not_read_are_refused(argv, message, tmp_path, capsys):
  (tmp_path / 'run.toml').write_text('client_lr = 0.3\nalgorithm = "fedsgd"\n')
  assert cli.main(['train', *argv, '--quiet']) == 2
  assert message in capsys.readouterr().err
  assert cli.main(['train', '--config', 'run.toml', '--quiet']) == 2  # a file too
  assert '--client-lr does not apply to --algorithm fedsgd' in capsys.readouterr().err


def test_datasets_and_plot(tmp_path, capsys):
  assert cli.main(['datasets']) == 0
  out = capsys.readouterr().out
  assert re.search(r'^digits +arrays +yes', out, re.M)
  assert 'movielens_100k' in out and 'stackoverflow' in out
  assert cli.main(['train', *SMALL, '--out', 'run', '--quiet']) == 0
  capsys.readouterr()
  assert cli.main(['plot', 'run']) == 0
  paths = capsys.readouterr().out.split()
  assert sorted(p.rsplit('/', 1)[-1] for p in paths) == ['accuracy.png', 'loss.png']
  for path in paths:
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'


def test_fedrecon_matrix_factorization_on_a_movielens_file(tmp_path, capsys):
  # A small file in MovieLens' u.data format: user item rating timestamp, tab-separated.
  rng = np.random.default_rng(0)
  rows = [
    f'{user}\t{item}\t{rng.integers(1, 6)}\t{1000 * user + item}'
    for user in range(1, 13)
    for item in rng.choice(np.arange(1, 41), 30, replace=False)
  ]
  (tmp_path / 'u.data').write_text('\n'.join(rows) + '\n')
  argv = ['train', '--dataset', 'movielens_100k', '--data-path', 'u.data', '--model', 'mf']
  argv += ['--algorithm', 'fedrecon', '--batch-size', '2', '--rounds', '2', '--quiet']
  assert cli.main([*argv, '--clients-per-round', '4', '--out', 'mf']) == 0
  out = capsys.readouterr().out
  rmse = float(re.search(r'final: .*test rmse (\d+\.\d+)', out).group(1))
  assert 0 < rmse < 5
  assert _last_metrics(tmp_path / 'mf')['evaluation/rmse'] == pytest.approx(rmse, abs=1e-4)
  assert cli.main(['train', '--model', 'mf', '--algorithm', 'fedrecon']) == 2
  assert 'mf needs --dataset movielens_100k; got digits' in capsys.readouterr().err


def test_aggregators_train_and_dp_stops_at_the_epsilon_budget(capsys):
  for i, extra in enumerate(
    [
      ['--aggregator', 'robust'],
      ['--aggregator', 'clip', '--clip', '0.5'],
      ['--aggregator', 'zero', '--algorithm', 'fedavg_unweighted'],
      ['--aggregator', 'trimmed_mean', '--trim-fraction', '0.2'],
      ['--aggregator', 'krum', '--byzantine', '1'],
      ['--aggregator', 'compression', '--bits', '4'],
      ['--aggregator', 'secure'],
    ]
  ):
    argv = ['train', *SMALL, '--rounds', '1', '--epochs', '1', '--out', f'agg{i}', '--quiet']
    argv += ['--model', 'logreg']  # the aggregator is under test, not the model
    assert cli.main([*argv, *extra]) == 0
    assert re.search(r'final: test accuracy 0\.\d+', capsys.readouterr().out)
  dp = ['--aggregator', 'dp', '--clip', '0.5', '--noise-multiplier', '1.0']
  argv = ['train', '--rounds', '30', '--eval-every', '10', '--out', 'dp', '--model', 'logreg', *dp]
  assert cli.main([*argv, '--epsilon-budget', '20']) == 0
  out = capsys.readouterr().out
  assert 'fixed-size sampling without replacement (10 of 30)' in out
  accountant = fl.aggregators.PrivacyAccountant(1.0, 10, 30, 0.1 / 30, sampling='fixed_size')
  last_round = max(r for r in range(31) if accountant.epsilon(r) <= 20)
  assert 0 < last_round < 30
  last = _last_metrics('dp')
  assert last['round_num'] == last_round
  assert last['privacy/epsilon'] == pytest.approx(accountant.epsilon(last_round))
  assert f'after {last_round} rounds' in out
  assert cli.main(['train', '--resume', '--out', 'dp']) == 0  # nothing left to train: says why
  out = capsys.readouterr().out
  assert f'stopped at round {last_round} by the privacy budget' in out
  assert _last_metrics('dp')['round_num'] == last_round


def test_a_refused_resume_changes_nothing(tmp_path, capsys):
  argv = ['train', *SMALL, '--epochs', '1', '--out', 'run', '--quiet']
  assert cli.main(argv) == 0
  saved = (tmp_path / 'run' / 'config.json').read_text()
  assert cli.main(['train', '--resume', '--out', 'run', '--rounds', '2', '--quiet']) == 2
  err = capsys.readouterr().err
  assert 'already holds round 4, past 2; nothing was changed' in err
  assert 'Traceback' not in err
  assert (tmp_path / 'run' / 'config.json').read_text() == saved
  assert cli.main(['train', '--resume', '--out', 'run', '--quiet']) == 0  # still resumable


@pytest.mark.parametrize(
  'case', ['out_is_a_file', 'config_is_a_dir', 'config_is_binary', 'damaged']
)
def test_file_errors_are_one_line_without_traceback(case, tmp_path, capsys):
  (tmp_path / 'a_file').write_text('x')
  (tmp_path / 'a_dir').mkdir()
  (tmp_path / 'binary.toml').write_bytes(bytes(range(256)))
  (tmp_path / 'run').mkdir()
  (tmp_path / 'run' / 'config.json').write_text('{"rounds": 3')
  argv = {
    'out_is_a_file': ['train', '--out', 'a_file/run', '--quiet'],
    'config_is_a_dir': ['train', '--config', 'a_dir'],
    'config_is_binary': ['train', '--config', 'binary.toml'],
    'damaged': ['train', '--resume', '--out', 'run'],
  }[case]
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith('fedjax-lite train: error:') and err.count('\n') == 1
  assert 'Traceback' not in err
  assert {
    'out_is_a_file': 'a_file',
    'config_is_a_dir': 'a_dir',
    'config_is_binary': 'binary.toml',
    'damaged': 'config.json',
  }[case] in err


def test_ctrl_c_exits_130_and_a_closed_pipe_exits_quietly(monkeypatch, capsys):
  def interrupt(config, **kwargs):
    raise KeyboardInterrupt

  monkeypatch.setattr(_experiment, 'build_experiment', interrupt)
  assert cli.main(['train', '--quiet']) == 130
  assert capsys.readouterr().err == 'fedjax-lite train: interrupted\n'

  def closed_pipe(*args, **kwargs):
    raise BrokenPipeError

  monkeypatch.setattr('builtins.print', closed_pipe)
  monkeypatch.setattr(sys, 'stdout', sys.stdout)  # main swaps it for /dev/null; restored after
  assert cli.main(['datasets']) == 0


def _digits_file(path, labels):
  """A digits.csv.gz of 100 random images with the given labels (cycled)."""
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 17, (100, 64))
  y = np.resize(np.asarray(labels), 100)
  with gzip.open(path, 'wt') as f:
    np.savetxt(f, np.column_stack([pixels, y]), fmt='%d', delimiter=',')
  return str(path)


def _plot_inputs(tmp_path):
  (tmp_path / 'no_metrics').mkdir()
  (tmp_path / 'damaged').mkdir()
  (tmp_path / 'damaged' / 'metrics.jsonl').write_text(
    '{"round_num": 1}\nnot json\n{"round_num": 2}\n'
  )
  (tmp_path / 'no_values').mkdir()
  (tmp_path / 'no_values' / 'metrics.jsonl').write_text(
    '{"round_num": 1, "client_work/train/loss": "x"}\n'
  )


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['train', '--client-lr', 'inf'], "--client-lr: expected a number > 0; got 'inf'"),
    (['train', '--server-lr', 'nan'], "--server-lr: expected a number > 0; got 'nan'"),
    (['train', '--seed', str(2**64)], '--seed: expected an int in [0, 4294967295]'),
    (['train', '--num-clients', '1797'], '--num-clients: 1797 clients exceed the 1438 examples'),
    (
      ['train', '--num-clients', '800', '--partition', 'shards'],
      '--partition shards with --num-clients 800: 1600 shards need at least 1600 examples',
    ),
    (['train', '--data-path', 'nowhere.csv.gz'], "--data-path: 'nowhere.csv.gz' does not hold"),
    (['train', '--data-path', 'neg.csv.gz'], 'the training set of digits has label -1'),
    (['train', '--dataset', 'emnist', '--data-path', 'no_metrics'], "--data-path: 'no_metrics'"),
    (['plot', 'no_metrics'], 'RUN_DIR: run_dir_or_metrics_file'),
    (['plot', 'damaged'], 'metrics.jsonl line 2 is not JSON'),
    (['plot', 'no_values'], 'has no loss or accuracy values to plot'),
    (['train', '--tensorboard'], 'needs tensorboardX. Tip: pip install'),
    (
      ['train', '--aggregator', 'krum', '--byzantine', '4', '--clients-per-round', '10'],
      '--aggregator krum with --byzantine 4 needs more than 10 clients a round',
    ),
  ],
)
def test_user_errors_are_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
  _digits_file(tmp_path / 'neg.csv.gz', [-1, *range(9)])
  _plot_inputs(tmp_path)
  monkeypatch.setitem(sys.modules, 'tensorboardX', None)  # the optional extra is missing
  assert cli.main([*argv, '--quiet'] if argv[0] == 'train' else argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(f'fedjax-lite {argv[0]}: error: ') and err.count('\n') == 1, err
  assert 'Traceback' not in err
  assert message in err
  assert not (tmp_path / 'no_metrics' / 'loss.png').exists()


def test_labels_outside_the_classes_are_named_per_client():
  population = fl.data.InMemoryFederatedData(
    {
      'ok': {'x': np.zeros((3, 2), np.float32), 'y': np.array([0, 1, 2])},
      'bad': {'x': np.zeros((2, 2), np.float32), 'y': np.array([1, 15])},
    }
  )
  fl.data.batch_cohort(population, ['ok'], batch_size=2, num_classes=3)
  with pytest.raises(
    ValueError,
    match=r"client 'bad' has label 15 \(1 such labels\); labels must be class indices in \[0, 3\)",
  ):
    fl.data.batch_cohort(population, ['ok', 'bad'], batch_size=2, num_classes=3)


def test_a_second_process_on_the_same_run_folder_is_refused(tmp_path, capsys):
  holder = subprocess.Popen(
    [
      sys.executable,
      '-c',
      'import sys, time\nfrom fedjax_lite import simulation\n'
      'with simulation.RunFolderLock(sys.argv[1]):\n  print("held", flush=True)\n  time.sleep(60)',
      str(tmp_path / 'run'),
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == 'held'
    assert cli.main(['train', *SMALL, '--out', 'run', '--quiet']) == 2
    err = capsys.readouterr().err
    assert f'--out: run is in use by process {holder.pid} on ' in err
    assert not (tmp_path / 'run' / 'config.json').exists()  # nothing written
  finally:
    holder.kill()
    holder.wait()
  assert cli.main(['train', *SMALL, '--out', 'run', '--quiet']) == 0  # released with its holder


def test_a_finished_run_is_extended_only_by_an_explicit_rounds_and_keeps_its_result(capsys):
  assert cli.main(['train', *SMALL, '--out', 'run', '--keep', '1']) == 0
  capsys.readouterr()
  assert cli.main(['train', '--out', 'run']) == 0  # no --rounds: nothing more is trained
  out = capsys.readouterr().out
  assert 'finished at round 4; pass --rounds N to extend it' in out
  assert 'round    5' not in out
  manager = fl.simulation.FileCheckpointManager('run/checkpoints')
  assert manager.checkpoint_rounds() == [4]
  assert cli.main(['train', '--out', 'run', '--rounds', '6', '--quiet']) == 0
  assert manager.checkpoint_rounds() == [4, 6]  # keep=1, but round 4 was the finished run's


def test_the_resume_header_names_the_round_actually_restored(capsys):
  assert cli.main(['train', *SMALL, '--out', 'run', '--quiet']) == 0
  manager = fl.simulation.FileCheckpointManager('run/checkpoints')
  with open(manager.checkpoint_path(4), 'r+b') as f:  # damage the latest checkpoint
    f.seek(40)
    f.write(b'garbage')
  with pytest.warns(RuntimeWarning, match='ckpt_4.msgpack is unreadable'):
    assert cli.main(['train', '--out', 'run', '--rounds', '5']) == 0
  assert 'writing to run (resuming after round 3)' in capsys.readouterr().out


def test_divergence_is_reported_per_round_and_fails_the_run(tmp_path, capsys):
  argv = ['train', *SMALL, '--model', 'mlp', '--out', 'run', '--client-lr', '1e30']  # overflows
  with pytest.warns(RuntimeWarning) as caught:
    code = cli.main(argv)
  messages = [str(w.message) for w in caught]
  assert any('round 1: no usable client; all 5 clients with data' in m for m in messages)
  out = capsys.readouterr()
  assert 'excluded 5 non-finite clients' in out.out
  # No client contributed: the round's training loss is undefined (nan), not 0.
  assert re.search(r'^round +1 +loss nan +accuracy nan +s/round [\d.]+ +compiled in', out.out, re.M)
  rows = [
    json.loads(line) for line in (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  ]
  assert rows[1]['client_work/non_finite_clients'] == 5
  assert code == 0  # every update was excluded: the model stood still and is finite
  argv = ['train', *SMALL, '--model', 'mlp', '--out', 'run2', '--server-lr', '1e38']
  with pytest.warns(RuntimeWarning):
    assert cli.main([*argv, '--quiet']) == 1
  err = capsys.readouterr().err
  assert 'fedjax-lite train: error: the model diverged: after round 4' in err


def test_the_example_is_the_main_job_written_out(capsys):
  example = runpy.run_path(str(pathlib.Path(__file__).parents[1] / 'examples' / 'fedavg_digits.py'))
  accuracy = example['main'](rounds=3)
  assert cli.main(['train', '--rounds', '3', '--quiet']) == 0
  out = capsys.readouterr().out
  assert re.search(rf'final: test accuracy {accuracy:.4f}  test loss', out)


@pytest.mark.parametrize(
  ('argv', 'buffered'),
  [(['datasets'], True), (['datasets'], False), (['sweep', '--help'], True)],
)
def test_a_reader_that_leaves_early_gets_no_trace(argv, buffered):
  # `fedjax-lite datasets | head -1`, with the reader gone before the command writes anything.
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONUNBUFFERED'}
  if not buffered:
    env['PYTHONUNBUFFERED'] = '1'
  command = subprocess.Popen(
    [sys.executable, '-m', 'fedjax_lite.cli', *argv],
    stdout=subprocess.PIPE,
    stderr=subprocess.PIPE,
    env=env,
  )
  command.stdout.close()
  err = command.stderr.read().decode()
  assert command.wait() == 0
  assert err == ''


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (
      ['train', '--roundz', '3'],
      'fedjax-lite train: error: unknown flag --roundz. Did you mean --rounds?',
    ),
    (
      ['train', '--rou', '2'],
      'fedjax-lite train: error: unknown flag --rou. Did you mean --rounds?',
    ),
    (['train', '--rou=2'], 'fedjax-lite train: error: unknown flag --rou. Did you mean --rounds?'),
    (
      ['sweep', '--config', 'grid.toml', '--runs-per', '1'],
      'fedjax-lite sweep: error: unknown flag --runs-per. Did you mean --runs-per-program?',
    ),
    (['train', '--rounds'], 'fedjax-lite train: error: argument --rounds: expected one argument'),
    (['train', 'extra'], "fedjax-lite train: error: unexpected argument 'extra'"),
    (['fly'], "fedjax-lite: error: argument command: invalid choice: 'fly'"),
  ],
)
def test_argument_errors_are_one_line_and_abbreviations_are_refused(argv, message, capsys):
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith(message)
  assert err.count('\n') == 1 and 'usage:' not in err
  assert not pathlib.Path('runs').exists()  # nothing ran


def test_round_lines_show_seconds_per_round_without_compilation(capsys):
  printer = cli._PrintMetrics()
  try:
    x = jnp.arange(64.0).reshape(8, 8)
    jax.block_until_ready(jax.jit(lambda x: jnp.linalg.qr(x @ x.T + 1.0)[0])(x))  # compiles
    timing = {'timing/round_seconds': 30.0, 'timing/examples_per_second': 5.0}
    printer.release({'client_work/train/loss': 0.5, **timing}, 1)
    timing = {'timing/round_seconds': 0.25, 'timing/examples_per_second': 40.0}
    printer.release({'client_work/train/loss': 0.25, **timing}, 2)
  finally:
    printer.close()
  first, second = capsys.readouterr().out.splitlines()
  compiled = float(re.search(r'compiled in ([\d.]+) s$', first).group(1))
  assert 0 < compiled < 30
  seconds = float(re.search(r's/round ([\d.]+)', first).group(1))
  assert seconds == pytest.approx(30.0 - compiled, abs=0.01)
  assert 'examples/s' not in first  # that round's rate includes compiling
  assert second == 'round    2  loss 0.2500  s/round 0.250  examples/s 40'


def test_the_chunk_is_measured_once_reported_and_can_be_fixed_or_left_unmeasured(
  monkeypatch, capsys, tmp_path
):
  monkeypatch.setenv('FEDJAX_LITE_TUNE', '1')  # as a user runs it (the suite turns it off)
  monkeypatch.setenv('FEDJAX_LITE_CACHE_DIR', str(tmp_path / 'layouts'))
  argv = ['train', *SMALL, '--rounds', '2', '--epochs', '1']

  def round_line(out, round_num):
    return next(line for line in out.splitlines() if line.startswith(f'round {round_num:4d}'))

  assert cli.main([*argv, '--out', 'auto']) == 0
  out = capsys.readouterr().out
  chosen = re.search(r'client chunk (\d+) \(chosen in \d+\.\d s\)', round_line(out, 1))
  assert chosen and 'client chunk' not in round_line(out, 2), out
  rows = [json.loads(line) for line in pathlib.Path('auto/metrics.jsonl').read_text().splitlines()]
  chunk = int(chosen[1])
  assert [r.get('layout/client_chunk_size') for r in rows] == [None, chunk, chunk]
  assert [
    e['chunk'] for e in json.loads((tmp_path / 'layouts' / 'layouts.json').read_text()).values()
  ] == [chunk]
  for out, chunk_argv in [('fixed', ['--client-chunk-size', '3']), ('default', ['--no-tune'])]:
    assert cli.main([*argv, '--out', out, *chunk_argv]) == 0
    assert 'client chunk' not in round_line(capsys.readouterr().out, 1)
    assert 'layout/client_chunk_size' not in _last_metrics(out)  # nothing measured
    assert json.loads(pathlib.Path(f'{out}/config.json').read_text())['client_chunk_size'] == (
      3 if out == 'fixed' else 'auto'
    )
  assert cli.main([*argv, '--out', 'bad', '--client-chunk-size', '0']) == 2
  err = capsys.readouterr().err
  assert "--client-chunk-size: expected 'auto' or an int >= 1; got '0'" in err, err


def test_synthetic_data_with_stragglers_trains_from_the_command(capsys):
  argv = ['train', '--dataset', 'synthetic_1_1', '--model', 'logreg', '--rounds', '2']
  argv += ['--epochs', '4', '--batch-size', '10', '--client-lr', '0.01', '--quiet']
  assert cli.main([*argv, '--out', 'all']) == 0
  assert (
    cli.main([*argv, '--out', 'drop', '--stragglers', '0.5', '--straggler-policy', 'drop']) == 0
  )
  # Half of each cohort dropped: about half the examples (the cohort is the same).
  full, half = (_last_metrics(out)['client_work/train/num_examples'] for out in ('all', 'drop'))
  assert 0 < half < full
  config = json.loads(pathlib.Path('drop/config.json').read_text())
  assert (config['stragglers'], config['straggler_policy']) == (0.5, 'drop')
  assert cli.main([*argv, '--out', 'bad', '--stragglers', '1']) == 2
  assert '--stragglers: expected a number in [0, 1); got' in capsys.readouterr().err


def test_load_run_brings_a_command_run_back_and_evaluates_it_on_your_data():
  assert cli.main(['train', *SMALL, '--out', 'run', '--quiet']) == 0  # 4 rounds, eval every 2
  run = fl.simulation.load_run('run')
  assert run.round_num == 4 and run.config['rounds'] == 4 and sorted(run.metrics) == list(range(5))
  last = run.metrics[4]
  # The held-out evaluation the run released, again from the loaded state.
  again = run.evaluate()
  assert again['accuracy'] == pytest.approx(last['evaluation/accuracy'], abs=1e-6)
  weights = run.process.get_model_weights(_checkpoint('run', 4))
  for a, b in zip(jax.tree.leaves(run.model_weights), jax.tree.leaves(weights), strict=True):
    np.testing.assert_array_equal(a, b)
  # Your own data: a few held-out digits as one client.
  x, y = fl.data.load_digits()
  mine = fl.data.build_client_batches([{'x': x[:50], 'y': y[:50]}], batch_size=25, shuffle=False)
  assert run.evaluate(mine)['num_examples'] == 50
  assert fl.simulation.load_run('run', round_num=2).round_num == 2
  with pytest.raises(
    ValueError, match=r'no checkpoint of round 1 in run; it has rounds \[2, 3, 4\]'
  ):
    fl.simulation.load_run('run', round_num=1)
  with pytest.raises(FileNotFoundError, match='nowhere is not a run folder'):
    fl.simulation.load_run('nowhere')


def test_your_own_model_trains_from_the_command_by_import_path(tmp_path, capsys):
  (tmp_path / 'my_models_for_cli.py').write_text(
    'import fedjax_lite as fl\n'
    'def wide(input_shape, num_classes, seed):\n'
    '  return fl.models.mlp_classifier(input_shape[0], num_classes, (32,), seed)\n'
    'def broken(input_shape, num_classes, seed):\n'
    '  return {"not": "a model"}\n'
  )
  argv = ['train', *SMALL, '--rounds', '2', '--quiet']
  assert cli.main([*argv, '--model', 'my_models_for_cli:wide', '--out', 'mine']) == 0
  run = fl.simulation.load_run('mine')
  shapes = sorted(w.shape for w in jax.tree.leaves(run.model_weights.trainable))
  assert shapes == [(10,), (32,), (32, 10), (64, 32)]  # its hidden layer of 32, not mlp's 200s
  for model, message in [
    ('my_models_for_cli:broken', 'must return a fl.FunctionalModel; got dict'),
    ('my_models_for_cli:missing', 'my_models_for_cli has no missing'),
    ('no_such_module_here:build', 'cannot import no_such_module_here'),
  ]:
    assert cli.main([*argv, '--model', model, '--out', 'bad']) == 2
    err = capsys.readouterr().err
    assert err.startswith('fedjax-lite train: error: --model: ') and message in err, err
  assert cli.main([*argv, '--model', 'not a path', '--out', 'bad']) == 2
  assert 'or an import path module:callable' in capsys.readouterr().err
