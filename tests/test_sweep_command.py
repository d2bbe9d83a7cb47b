"""`fedjax-lite sweep`: a TOML grid as few programs as possible, per-run folders equal to
separate `train` runs, a summary and a comparison plot."""

import json
import pathlib
import re
import shutil

import jax
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import _experiment, _sweep_command, cli

BASE = 'rounds = 3\neval_every = 1\nclients_per_round = 5\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _rows(path):
  """A run's metrics without those that describe its speed (timing, memory, lanes)."""
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  return [
    {k: v for k, v in r.items() if not k.startswith(('timing/', 'memory/', 'layout/'))}
    for r in rows
  ]


def _weights(run_dir):
  """The model weights of a run folder's latest checkpoint, as numpy arrays."""
  config = json.loads(pathlib.Path(run_dir, 'config.json').read_text())
  process = _experiment.build_experiment(config).process
  manager = fl.simulation.FileCheckpointManager(pathlib.Path(run_dir, 'checkpoints'))
  state, _ = manager.load_latest_checkpoint(jax.eval_shape(process.initialize))
  return [np.asarray(x) for x in jax.tree.leaves(process.get_model_weights(state))]


def test_the_grid_is_every_combination(tmp_path):
  (tmp_path / 'grid.toml').write_text('client_lr = [0.03, 0.1]\nseed = [0, 1, 2]\nrounds = 4\n')
  points, varying = _sweep_command.read_grid('grid.toml')
  assert varying == ['client_lr', 'seed']
  assert len(points) == 6 and points[5] == {'client_lr': 0.1, 'seed': 2, 'rounds': 4}
  assert _sweep_command.run_name(points[5], varying) == 'client_lr=0.1,seed=2'
  (tmp_path / 'bad.toml').write_text('client_lr = [0.1, -1]\n')
  with pytest.raises(ValueError, match=r'bad\.toml: client_lr: expected a number > 0; got -1'):
    _sweep_command.read_grid('bad.toml')


def test_a_sweep_is_one_program_whose_runs_equal_separate_runs(tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(BASE + 'client_lr = [0.03, 0.1]\nseed = [0, 1]\n')
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw']) == 0
  out = capsys.readouterr().out
  assert 'sweep of 4 runs (client_lr, seed) as 1 program' in out
  assert re.search(r'client_lr=0\.1 +2 +0\.\d{4} ± 0\.\d{4}', out)
  summary = json.loads((tmp_path / 'sw' / 'summary.json').read_text())['configurations']
  assert [row['configuration'] for row in summary] == ['client_lr=0.03', 'client_lr=0.1']
  assert (tmp_path / 'sw' / 'comparison.png').stat().st_size > 10_000
  # What holds (docs/simulation.md): for the first rounds a swept run equals the same settings
  # trained alone, and the sweep equals itself run as programs of one run, to 1e-6 (float32
  # rounding: the order of the sums differs under vmap), accuracy exactly. Later, a ReLU whose
  # input sits at 0 can flip and the runs part (measured: after round 10 on this MLP).
  argv = ['train', '--rounds', '3', '--eval-every', '1', '--clients-per-round', '5']
  assert cli.main([*argv, '--client-lr', '0.1', '--seed', '1', '--out', 'alone', '--quiet']) == 0
  swept, alone = _rows('sw/client_lr=0.1,seed=1/metrics.jsonl'), _rows('alone/metrics.jsonl')
  assert len(swept) == len(alone) == 4
  for a, b in zip(swept, alone, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    assert a['evaluation/accuracy'] == b['evaluation/accuracy']
  for x, y in zip(_weights('sw/client_lr=0.1,seed=1'), _weights('alone'), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  args = ['sweep', '--config', 'grid.toml', '--out', 'sw1', '--runs-per-program', '1', '--quiet']
  assert cli.main(args) == 0
  one = json.loads((tmp_path / 'sw1' / 'summary.json').read_text())['configurations']
  for row, row_one in zip(summary, one, strict=True):
    for name in ('final_accuracy', 'best_accuracy', 'final_loss', 'final_train_loss'):
      np.testing.assert_allclose(row[name]['values'], row_one[name]['values'], atol=1e-6)
    assert row['final_accuracy']['values'] == row_one['final_accuracy']['values']
  # Its folder is an ordinary run: train extends it.
  assert cli.main(['train', '--out', 'sw/client_lr=0.1,seed=1', '--rounds', '4', '--quiet']) == 0


def test_a_scaffold_sweep_keeps_a_store_per_run_and_equals_train_alone(tmp_path, capsys):
  # Before: a stateful algorithm was refused in a sweep ('keeps per-client state').
  grid = BASE + 'algorithm = "scaffold"\nclient_lr = [0.05, 0.1]\nseed = [0, 1]\n'
  (tmp_path / 'grid.toml').write_text(grid)
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 0
  argv = ['train', '--algorithm', 'scaffold', '--rounds', '3', '--eval-every', '1']
  argv += ['--clients-per-round', '5', '--client-lr', '0.1', '--seed', '1', '--out', 'alone']
  assert cli.main([*argv, '--quiet']) == 0
  run = 'sw/client_lr=0.1,seed=1'
  assert (tmp_path / run / 'client_states.sqlite').exists()
  # As for FedAvg: float32 rounding for the first rounds, accuracy exactly.
  for a, b in zip(_rows(f'{run}/metrics.jsonl'), _rows('alone/metrics.jsonl'), strict=True):
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=0, atol=1e-6, err_msg=key)
    assert a['evaluation/accuracy'] == b['evaluation/accuracy']
  experiment = _experiment.build_experiment(
    json.loads(pathlib.Path(run, 'config.json').read_text())
  )
  ids = experiment.train_data.client_ids
  controls = []
  for folder in (run, 'alone'):
    path = pathlib.Path(folder, 'client_states.sqlite')
    store = fl.simulation.SQLiteClientStateStore(path, experiment.process.initial_client_state)
    controls.append(jax.tree.leaves(store.get(ids)))
    store.close()
  assert np.any(controls[0][0])
  for x, y in zip(*controls, strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=1e-6)
  # Its folder is an ordinary run with its client states: train extends it.
  assert cli.main(['train', '--out', run, '--rounds', '4', '--quiet']) == 0


def test_settings_that_change_the_program_split_the_sweep(tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(BASE + 'model = ["logreg", "mlp"]\nserver_lr = [0.5, 1.0]\n')
  assert cli.main(['sweep', '--config', 'grid.toml', '--quiet']) == 0
  out = capsys.readouterr().out
  assert 'model=logreg,server_lr=0.5' in out and 'model=mlp,server_lr=1.0' in out
  summary = json.loads((tmp_path / 'runs/sweep-grid/summary.json').read_text())
  assert len(summary['configurations']) == 4


@pytest.mark.parametrize(
  ('grid', 'message'),
  [
    (
      'proximal_strength = [0.1, 0.2]\n',
      '--proximal-strength does not apply',
    ),
    ('roundz = [1, 2]\n', "unknown key 'roundz'"),
  ],
)
def test_bad_sweeps_are_one_line_errors(grid, message, tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(BASE + grid)
  assert cli.main(['sweep', '--config', 'grid.toml']) == 2
  err = capsys.readouterr().err
  assert err.startswith('fedjax-lite sweep: error: ') and message in err


def test_a_rerun_with_other_settings_changes_nothing(tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(BASE + 'client_lr = [0.03, 0.1]\n')
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 0
  saved = (tmp_path / 'sw' / 'client_lr=0.1' / 'config.json').read_text()
  (tmp_path / 'grid.toml').write_text(BASE + 'client_lr = [0.03, 0.1]\nepochs = 1\n')
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 2
  assert 'holds a run with other settings (epochs); nothing was changed' in capsys.readouterr().err
  assert (tmp_path / 'sw' / 'client_lr=0.1' / 'config.json').read_text() == saved
  (tmp_path / 'grid.toml').write_text(
    BASE.replace('rounds = 3', 'rounds = 4') + 'client_lr = [0.03, 0.1]\n'
  )
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 0  # extended
  assert '"rounds": 4' in (tmp_path / 'sw' / 'client_lr=0.1' / 'config.json').read_text()
  # A run that lost its checkpoints cannot restart its group from round 0 under the others.
  shutil.rmtree(tmp_path / 'sw' / 'client_lr=0.03' / 'checkpoints')
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 2
  err = capsys.readouterr().err
  assert 'client_lr=0.03 hold no checkpoint while the other runs of their program do' in err
  assert 'Tip: rerun with --runs-per-program 1' in err


def test_a_diverged_run_fails_the_sweep_with_nan_in_the_table_and_strict_json(tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(
    'rounds = 2\neval_every = 1\nclients_per_round = 5\nserver_lr = [1.0, 1e38]\n'
  )
  with pytest.warns(RuntimeWarning, match='no usable client'):
    assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw']) == 1
  out, err = capsys.readouterr()
  assert err.splitlines()[-1].startswith(
    'fedjax-lite sweep: error: 1 of 2 runs diverged (non-finite weights or test loss): '
    'server_lr=1e+38. Tip: lower --client-lr'
  )
  # Its losses are nan (the training loss of a round without clients too), not 0.0000.
  assert re.search(r'^server_lr=1e\+38 +1 +0\.\d{4} +0\.\d{4} +nan +nan$', out, re.M)

  def refuse(constant):
    raise AssertionError(f'summary.json holds {constant}, which strict JSON does not allow')

  summary = json.loads((tmp_path / 'sw' / 'summary.json').read_text(), parse_constant=refuse)
  fine, diverged = summary['configurations']
  assert fine['diverged'] == [] and diverged['diverged'] == ['server_lr=1e+38']
  assert diverged['final_loss']['values'] == [None] and diverged['final_loss']['std'] is None


def test_values_added_to_a_ran_grid_run_with_runs_per_program_1(tmp_path, capsys):
  grid = 'rounds = 2\nclients_per_round = 5\nclient_lr = [{}]\n'
  (tmp_path / 'grid.toml').write_text(grid.format('0.1, 1'))
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 0
  before = (tmp_path / 'sw' / 'client_lr=0.1' / 'metrics.jsonl').read_text()
  (tmp_path / 'grid.toml').write_text(grid.format('0.1, 0.3, 1'))
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet']) == 2
  err = capsys.readouterr().err
  assert err.startswith(
    'fedjax-lite sweep: error: --out: client_lr=0.3 hold no checkpoint while the other runs of '
    'their program do'
  )
  assert 'Tip: rerun with --runs-per-program 1' in err and err.count('\n') == 1
  args = ['sweep', '--config', 'grid.toml', '--out', 'sw', '--quiet', '--runs-per-program', '1']
  assert cli.main(args) == 0  # the new run trains, the finished ones stay as they were
  assert (tmp_path / 'sw' / 'client_lr=0.1' / 'metrics.jsonl').read_text() == before
  assert list(fl.simulation.load_metrics('sw/client_lr=0.3/metrics.jsonl')) == [0, 1, 2]
  summary = json.loads((tmp_path / 'sw' / 'summary.json').read_text())['configurations']
  assert [row['configuration'] for row in summary] == [f'client_lr={x}' for x in (0.1, 0.3, 1.0)]


def _synthetic_sweep(root, curves):
  """Run folders under `root` from `{(client_lr, seed): [(round, metrics), ...]}`, as a sweep
  writes them; returns `(configs, run_dirs, varying)`."""
  varying = ['client_lr', 'seed']
  configs, run_dirs = [], []
  for (lr, seed), rounds in curves.items():
    config = {'client_lr': lr, 'seed': seed, 'rounds': 3}
    run_dir = root / _sweep_command.run_name(config, varying)
    run_dir.mkdir(parents=True)
    (run_dir / 'config.json').write_text(json.dumps(config))
    manager = fl.simulation.JSONLMetricsManager(run_dir / 'metrics.jsonl')
    for round_num, metrics in rounds:
      manager.release(metrics, round_num)
    configs.append(config)
    run_dirs.append(str(run_dir))
  return configs, run_dirs, varying


def _round(accuracy, loss, train_loss=0.5, examples=10):
  return {
    'client_work': {'train': {'loss': train_loss, 'num_examples': examples}},
    'evaluation': {'accuracy': accuracy, 'loss': loss},
    'timing': {'round_seconds': 0.1},
  }


CURVES = {
  (0.1, 0): [(1, _round(0.5, 1.0)), (2, _round(0.7, 0.8)), (3, _round(0.6, 0.9, 0.4))],
  (0.1, 1): [(1, _round(0.4, 1.1)), (2, _round(0.6, 0.9)), (3, _round(0.8, 0.7, 0.3))],
  (0.1, 2): [(1, _round(0.3, 1.2)), (2, _round(0.5, 1.0)), (3, _round(0.7, 0.8, 0.2))],
  (0.3, 0): [(1, _round(0.2, 2.0)), (2, _round(0.1, float('nan'), 0.0, examples=0))],
}


def test_the_summary_holds_per_seed_values_a_sample_std_and_each_split(tmp_path):
  configs, run_dirs, varying = _synthetic_sweep(tmp_path / 'sw', CURVES)
  rows = _sweep_command.summarize(configs, run_dirs, varying)
  _sweep_command.write_summary(str(tmp_path / 'summary.json'), rows)

  def refuse(constant):
    raise AssertionError(f'summary.json holds {constant}, which strict JSON does not allow')

  summary = json.loads((tmp_path / 'summary.json').read_text(), parse_constant=refuse)
  assert 'ddof=1' in summary['std'] and 'null' in summary['null']
  assert summary['metrics']['final_accuracy'] == {
    'key': 'evaluation/accuracy',
    'split': 'test',
    'statistic': 'the value at the last round that has one',
  }
  assert summary['metrics']['final_train_loss']['split'] == 'train'
  assert summary['metrics']['best_accuracy']['key'] == 'evaluation/accuracy'
  first, second = summary['configurations']
  assert first['configuration'] == 'client_lr=0.1' and first['seeds'] == [0, 1, 2]
  assert first['runs'] == ['client_lr=0.1,seed=0', 'client_lr=0.1,seed=1', 'client_lr=0.1,seed=2']
  final = first['final_accuracy']
  assert final['values'] == [0.6, 0.8, 0.7] and final['rounds'] == [3, 3, 3]
  assert final['mean'] == pytest.approx(0.7)
  assert final['std'] == pytest.approx(0.1)  # sample std: sqrt(((-.1)^2 + .1^2 + 0) / (3 - 1))
  best = first['best_accuracy']
  assert best['values'] == [0.7, 0.8, 0.7] and best['rounds'] == [2, 3, 3]
  assert first['final_train_loss']['values'] == [0.4, 0.3, 0.2]
  assert first['diverged'] == []
  # One seed: no std (null), not 0. The diverged run: a NaN test loss is null, and its
  # training loss of a round no client contributed to is null, not the 0 the process reports.
  assert second['final_accuracy'] == {'mean': 0.1, 'std': None, 'values': [0.1], 'rounds': [2]}
  assert second['final_loss']['values'] == [None] and second['final_loss']['mean'] is None
  assert second['final_train_loss']['values'] == [None]
  assert second['diverged'] == ['client_lr=0.3,seed=0']
  assert _sweep_command.diverged_runs(rows) == ['client_lr=0.3,seed=0']
  table = _sweep_command.format_summary(rows).splitlines()
  assert re.search(r'^client_lr=0\.1 +3 +0\.7000 ± 0\.1000 +0\.7333 ± 0\.0577', table[2])
  assert re.search(r'^client_lr=0\.3 +1 +0\.1000 +0\.2000 +nan +nan$', table[3])
  assert 'final_train_loss (train)' in table[0] and 'final_loss (test)' in table[0]
  assert 'sample std over seeds (ddof=1' in table[-1]


def test_runs_with_non_finite_weights_are_named_as_diverged(tmp_path):
  configs, run_dirs, varying = _synthetic_sweep(tmp_path / 'sw', dict(list(CURVES.items())[:2]))
  rows = _sweep_command.summarize(configs, run_dirs, varying, diverged=[1])
  assert _sweep_command.diverged_runs(rows) == ['client_lr=0.1,seed=1']


def test_the_comparison_shows_mean_and_sample_std_over_integer_rounds_and_a_loss_panel(tmp_path):
  configs, run_dirs, varying = _synthetic_sweep(tmp_path / 'sw', CURVES)
  figure = _sweep_command.comparison_figure(configs, run_dirs, varying)
  accuracy, loss = figure.axes
  figure.canvas.draw()
  for axes in (accuracy, loss):
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks
  mean_line = accuracy.lines[0]
  values = np.array([[0.5, 0.7, 0.6], [0.4, 0.6, 0.8], [0.3, 0.5, 0.7]])
  np.testing.assert_allclose(mean_line.get_xydata(), np.stack([[1, 2, 3], values.mean(0)], 1))
  assert mean_line.get_label() == 'client_lr=0.1 (3 seeds)'
  band = accuracy.collections[0].get_paths()[0].vertices
  std = values.std(0, ddof=1)  # the table's std
  np.testing.assert_allclose(band[:, 1].max(), (values.mean(0) + std).max())
  np.testing.assert_allclose(band[:, 1].min(), (values.mean(0) - std).min())
  assert len(accuracy.collections) == 1  # one seed: no band
  # The loss panel: test loss solid and training loss dashed, per configuration.
  assert [line.get_linestyle() for line in loss.lines] == ['-', '--', '-', '--']
  assert loss.get_ylabel() == 'test loss (solid), train loss (dashed)'
  assert 'band: ± sample std over seeds' in figure.texts[0].get_text()
  assert (
    len(_sweep_command.comparison_figure(configs, run_dirs, varying, 'evaluation/loss').axes) == 1
  )
  assert _sweep_command.comparison_figure(configs, run_dirs, varying, 'privacy/epsilon') is None


def test_plot_redraws_a_sweep_for_any_metric(tmp_path, capsys):
  _synthetic_sweep(tmp_path / 'sw', CURVES)
  assert _sweep_command.is_sweep('sw') and not _sweep_command.is_sweep('sw/client_lr=0.1,seed=0')
  assert cli.main(['plot', 'sw']) == 0
  assert capsys.readouterr().out.split() == ['sw/comparison.png']
  assert cli.main(['plot', 'sw', '--metric', 'loss', '--out', 'plots']) == 0
  assert capsys.readouterr().out.split() == ['plots/comparison-evaluation-loss.png']
  assert (tmp_path / 'plots' / 'comparison-evaluation-loss.png').read_bytes()[:4] == b'\x89PNG'
  assert cli.main(['plot', 'sw', '--metric', 'client_work/train/loss']) == 0
  assert capsys.readouterr().out.split() == ['sw/comparison-client_work-train-loss.png']
  assert cli.main(['plot', 'sw', '--metric', 'f1']) == 2
  err = capsys.readouterr().err
  assert err.startswith("fedjax-lite plot: error: --metric: no metric 'f1'; the metrics are ")
  assert err.count('\n') == 1
