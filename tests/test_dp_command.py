"""DP through the command: `--seed` keys the noise (each seed of a sweep its own), a sweep
accounts for ε and stops at the budget as `train` does, and the privacy settings that cannot
work are one-line errors."""

import json
import pathlib
import re

import jax
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import _catalogue, _config, _experiment, cli
from fedjax_lite.aggregators import _differential_privacy

DP = ['--aggregator', 'dp', '--noise-multiplier', '1.0']


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _config_of(**settings):
  config = _config.resolve({}, {'aggregator': 'dp', 'noise_multiplier': 1.0, **settings})
  return _catalogue.with_defaults(config, set(settings))


def _noise_keys(state):
  """The noise keys of every DP state in a process state (value noise, the clip's count noise)."""
  found = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, _differential_privacy.DPState))
  dp_states = [x for x in found if isinstance(x, _differential_privacy.DPState)]
  assert len(dp_states) == 1
  clip_key = getattr(dp_states[0].clip, 'rng', None)  # an adaptive clip's count noise
  return [np.asarray(k) for k in (dp_states[0].rng, clip_key) if k is not None]


@pytest.mark.parametrize('clip', [None, 0.5], ids=['adaptive', 'fixed'])
def test_the_seed_keys_the_dp_noise(clip):
  """Two seeds give different noise keys (value and, adaptive, count); one seed the same."""
  keys = {}
  for seed in (0, 1, 0):
    config = _config_of(seed=seed, clients_per_round=20, clip=clip)
    aggregator = _experiment._aggregator(config)
    keys.setdefault(seed, []).append(
      _noise_keys(aggregator.create({'w': np.zeros(3)}).initialize())
    )
  for a, b in zip(keys[0][0], keys[0][1], strict=True):
    np.testing.assert_array_equal(a, b)
  assert len(keys[0][0]) == (2 if clip is None else 1)
  for a, b in zip(keys[0][0], keys[1][0], strict=True):
    assert not np.array_equal(a, b)


def _grid(tmp_path, budget):
  (tmp_path / 'grid.toml').write_text(
    'rounds = 6\neval_every = 4\nclients_per_round = 10\nmodel = "logreg"\naggregator = "dp"\n'
    'clip = 0.5\n'
    f'noise_multiplier = 1.0\nepsilon_budget = {budget!r}\nseed = [0, 1]\n'
  )


def test_a_dp_sweep_accounts_epsilon_stops_at_the_budget_and_train_agrees(tmp_path, capsys):
  accountant = fl.aggregators.PrivacyAccountant(1.0, 10, 30, 0.1 / 30, sampling='fixed_size')
  budget = (accountant.epsilon(3) + accountant.epsilon(4)) / 2  # 3 rounds fit
  _grid(tmp_path, budget)
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw']) == 0
  out = capsys.readouterr().out
  assert f'epsilon {accountant.epsilon(3):.3f} after 3 rounds at delta=0.00333' in out
  states = []
  for seed in (0, 1):
    run_dir = tmp_path / 'sw' / f'seed={seed}'
    rows = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [row['round_num'] for row in rows] == [0, 1, 2, 3]
    assert [row['privacy/epsilon'] for row in rows[1:]] == pytest.approx(
      [accountant.epsilon(r) for r in (1, 2, 3)]
    )
    assert 'evaluation/accuracy' in rows[-1]  # the stop is evaluated as a last round is
    config = json.loads((run_dir / 'config.json').read_text())
    process = _experiment.build_experiment(config).process
    manager = fl.simulation.FileCheckpointManager(run_dir / 'checkpoints')
    states.append(manager.load_checkpoint(jax.eval_shape(process.initialize), 3))
    # `train` on the run folder: nothing more to run, the same ε.
    assert cli.main(['train', '--out', str(run_dir), '--quiet']) == 0
    final = capsys.readouterr().out
    assert f'epsilon {accountant.epsilon(3):.3f} after 3 rounds' in final
    assert len((run_dir / 'metrics.jsonl').read_text().splitlines()) == 4
  # Each seed of the sweep draws its own noise.
  for a, b in zip(_noise_keys(states[0]), _noise_keys(states[1]), strict=True):
    assert not np.array_equal(a, b)


@pytest.mark.parametrize('command', ['train', 'sweep'])
def test_a_budget_below_one_round_is_a_one_line_error(command, tmp_path, capsys):
  if command == 'train':
    argv = ['train', *DP, '--clip', '0.5', '--epsilon-budget', '0.5', '--out', 'run']
  else:
    _grid(tmp_path, 0.5)
    argv = ['sweep', '--config', 'grid.toml', '--out', 'run']
  assert cli.main(argv) == 2
  err = capsys.readouterr().err
  assert re.fullmatch(
    rf'fedjax-lite {command}: error: --epsilon-budget 0.5 is below the epsilon of one round '
    r'\(\d+\.\d+ at delta=0.00333\), so no round could run\. Tip: .*\n',
    err,
  )
  assert not pathlib.Path('run').exists()


def test_the_default_delta_is_below_one_over_the_clients_and_a_larger_one_is_refused(capsys):
  argv = ['train', *DP, '--clip', '0.5', '--rounds', '1', '--model', 'logreg', '--quiet']
  config = _config_of(clip=0.5)
  assert _experiment.build_experiment(config).privacy_accountant.target_delta == 0.1 / 30
  assert cli.main([*argv, '--target-delta', '0.04']) == 2
  err = capsys.readouterr().err
  assert err.startswith('fedjax-lite train: error: --target-delta 0.04 is not below 1/30 = 0.0333')
  assert len(err.splitlines()) == 1 and '--target-delta 0.00333' in err
  assert cli.main([*argv, '--target-delta', '0.01']) == 0  # below 1/30: accepted


def test_the_adaptive_clip_refusal_says_what_to_do(capsys):
  assert cli.main(['train', *DP, '--clients-per-round', '10', '--quiet']) == 2
  err = capsys.readouterr().err
  assert len(err.splitlines()) == 1 and 'clipped_count_stddev' not in err
  assert 'needs more than 10 clients a round for --noise-multiplier 1' in err
  assert 'Tip: pass a fixed clip (--clip 1.0' in err and 'raise --clients-per-round' in err


FTRL = ['--aggregator', 'dp_ftrl', '--clip', '0.5', '--noise-multiplier', '2', '--model', 'logreg']


def test_dp_ftrl_from_the_command_accounts_its_mechanism_and_schedule(tmp_path, capsys):
  argv = ['train', *FTRL, '--mechanism', 'banded', '--min-separation', '3', '--rounds', '6']
  argv += ['--clients-per-round', '5', '--eval-every', '3', '--out', 'run']
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  accountant = fl.aggregators.DPFTRLAccountant(
    'banded', 2.0, 0.1 / 30, total_rounds=6, min_separation=3
  )
  assert f'epsilon {accountant.epsilon(6):.3f} after 6 rounds' in out
  assert 'DP-FTRL banded mechanism for 6 rounds' in out  # the assumption, stated
  lines = (tmp_path / 'run' / 'metrics.jsonl').read_text().splitlines()
  rows = [json.loads(line) for line in lines]
  assert [r['privacy/epsilon'] for r in rows[1:]] == pytest.approx(
    [accountant.epsilon(r) for r in range(1, 7)]
  )
  # The cohorts the run drew keep every client 3 rounds apart.
  experiment = _experiment.build_experiment(
    json.loads((tmp_path / 'run' / 'config.json').read_text())
  )
  seen = {}
  for round_num in range(1, 7):
    for client in experiment.cohort_ids_fn(round_num):
      assert round_num - seen.get(client, -10) >= 3
      seen[client] = round_num
  # Its mechanism was built for 6 rounds: a longer run is a new run, not an extension.
  assert cli.main([*argv, '--rounds', '8']) == 2
  assert 'rounds: 6 -> 8' in capsys.readouterr().err


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--min-separation', '2'], '--min-separation does not apply to --aggregator mean'),
    (FTRL[:2], '--aggregator dp_ftrl needs --clip (a fixed L2 clip'),
    ([*FTRL, '--min-separation', '4', '--clients-per-round', '10'], 'exceeds the 7 clients'),
    ([*FTRL, '--mechanism', 'ring'], "--mechanism: unknown name 'ring'; expected one of tree"),
  ],
)
def test_dp_ftrl_settings_that_cannot_work_are_one_line_errors(argv, message, capsys):
  assert cli.main(['train', *argv, '--rounds', '4', '--out', 'bad']) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.splitlines()) == 1, err
