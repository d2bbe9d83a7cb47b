"""The `fedjax-lite` command: train (defaults, config file, resume), eval, datasets, plot."""

import json
import re
import sys

import jax
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import _experiment, cli

SMALL = ['--rounds', '4', '--eval-every', '2', '--clients-per-round', '5']


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
      '--aggregator dp: clipped_count_stddev (0.25) must be more than half the noise_multiplier',
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
    assert cli.main([*argv, *extra]) == 0
    assert re.search(r'final: test accuracy 0\.\d+', capsys.readouterr().out)
  dp = ['--aggregator', 'dp', '--clip', '0.5', '--noise-multiplier', '1.0']
  argv = ['train', '--rounds', '30', '--eval-every', '10', '--out', 'dp', *dp]
  assert cli.main([*argv, '--epsilon-budget', '5']) == 0
  out = capsys.readouterr().out
  assert 'fixed-size sampling without replacement (10 of 30)' in out
  accountant = fl.aggregators.PrivacyAccountant(1.0, 10, 30, 30**-1.1, sampling='fixed_size')
  last_round = max(r for r in range(31) if accountant.epsilon(r) <= 5)
  assert 0 < last_round < 30
  last = _last_metrics('dp')
  assert last['round_num'] == last_round
  assert last['privacy/epsilon'] == pytest.approx(accountant.epsilon(last_round))
  assert f'after {last_round} rounds' in out


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
  def interrupt(config):
    raise KeyboardInterrupt

  monkeypatch.setattr(_experiment, 'build_experiment', interrupt)
  assert cli.main(['train', '--quiet']) == 130
  assert capsys.readouterr().err == 'fedjax-lite train: interrupted\n'

  def closed_pipe(*args, **kwargs):
    raise BrokenPipeError

  monkeypatch.setattr('builtins.print', closed_pipe)
  monkeypatch.setattr(sys, 'stdout', sys.stdout)  # main swaps it for /dev/null; restored after
  assert cli.main(['datasets']) == 0
