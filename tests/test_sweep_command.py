"""`fedjax-lite sweep`: a TOML grid as few programs as possible, per-run folders equal to
separate `train` runs, a summary and a comparison plot."""

import json
import pathlib
import re
import shutil

import numpy as np
import pytest

from fedjax_lite import _sweep_command, cli

BASE = 'rounds = 3\neval_every = 1\nclients_per_round = 5\n'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _rows(path):
  rows = [json.loads(line) for line in pathlib.Path(path).read_text().splitlines()]
  return [{k: v for k, v in r.items() if not k.startswith(('timing/', 'memory/'))} for r in rows]


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
  summary = json.loads((tmp_path / 'sw' / 'summary.json').read_text())
  assert [row['configuration'] for row in summary] == ['client_lr=0.03', 'client_lr=0.1']
  assert (tmp_path / 'sw' / 'comparison.png').stat().st_size > 10_000
  # A run of the sweep equals the same settings trained alone.
  argv = ['train', '--rounds', '3', '--eval-every', '1', '--clients-per-round', '5']
  assert cli.main([*argv, '--client-lr', '0.1', '--seed', '1', '--out', 'alone', '--quiet']) == 0
  swept, alone = _rows('sw/client_lr=0.1,seed=1/metrics.jsonl'), _rows('alone/metrics.jsonl')
  assert len(swept) == len(alone) == 4
  for a, b in zip(swept, alone, strict=True):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_allclose(a[key], b[key], rtol=1e-6, err_msg=key)
  # Its folder is an ordinary run: train extends it.
  assert cli.main(['train', '--out', 'sw/client_lr=0.1,seed=1', '--rounds', '4', '--quiet']) == 0


def test_settings_that_change_the_program_split_the_sweep(tmp_path, capsys):
  (tmp_path / 'grid.toml').write_text(BASE + 'model = ["logreg", "mlp"]\nserver_lr = [0.5, 1.0]\n')
  assert cli.main(['sweep', '--config', 'grid.toml', '--quiet']) == 0
  out = capsys.readouterr().out
  assert 'model=logreg,server_lr=0.5' in out and 'model=mlp,server_lr=1.0' in out
  assert len(json.loads((tmp_path / 'runs/sweep-grid/summary.json').read_text())) == 4


@pytest.mark.parametrize(
  ('grid', 'message'),
  [
    (
      'proximal_strength = [0.1, 0.2]\n',
      '--proximal-strength does not apply',
    ),
    ('algorithm = "scaffold"\nclient_lr = [0.1, 0.2]\n', 'keeps per-client state'),
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
  assert 'hold no checkpoint while the other runs of their group do' in capsys.readouterr().err
