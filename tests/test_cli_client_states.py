"""`fedjax-lite train --algorithm scaffold`: a resume whose client state file is damaged or
missing stops with one line and exit status 2, never silently."""

import pytest

from fedjax_lite import cli

STORE = 'run/client_states.sqlite'


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _train(rounds):
  args = ['train', '--algorithm', 'scaffold', '--model', 'logreg', '--clients-per-round', '3']
  args += ['--epochs', '1', '--max-steps', '2']
  return cli.main([*args, '--rounds', str(rounds), '--out', 'run', '--quiet'])


def test_a_resume_without_its_client_states_is_one_line_and_exit_2(tmp_path, capsys):
  assert _train(1) == 0
  store = tmp_path / STORE
  intact = store.read_bytes()
  capsys.readouterr()
  for damage, message in [
    (lambda: store.write_bytes(intact[: len(intact) // 2]), 'cannot be used|is damaged'),
    (store.unlink, 'has no client states committed'),
  ]:
    damage()
    assert _train(2) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and err.startswith(f'fedjax-lite train: error: {STORE} ')
    assert any(m in err for m in message.split('|')) and 'Tip:' in err
