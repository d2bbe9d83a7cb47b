"""The main job: `fedjax-lite train` on the digits data."""

import re

import pytest

from fedjax_lite import cli


def test_train_default_reaches_90_percent(capsys):
  assert cli.main(['train']) == 0
  out = capsys.readouterr().out
  assert re.search(r'round +1 +loss', out)
  accuracy = float(re.search(r'test accuracy (\d\.\d+)', out).group(1))
  assert accuracy >= 0.90


@pytest.mark.parametrize(
  ('argv', 'message'),
  [
    (['train', '--rounds', '0'], 'expected an int >= 1'),
    (['train', '--client-lr', '-1'], 'expected a number > 0'),
    (['train', '--clients-per-round', '50'], 'exceeds --num-clients'),
    (['fly'], 'invalid choice'),
  ],
)
def test_bad_flags_exit_nonzero(argv, message, capsys):
  try:
    code = cli.main(argv)
  except SystemExit as exit_:
    code = exit_.code
  assert code != 0
  assert message in capsys.readouterr().err
