"""plot_run writes valid PNGs from a run's JSONL or CSV metrics."""

import os
import pathlib
import struct

import numpy as np
import pytest
import simulation_problem as sp

import fedjax_lite as fl

_PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


def _write_run(manager):
  manager.release({'evaluation': {'accuracy': 0.25, 'loss': 1.4}}, 0)
  for round_num in range(1, 5):
    metrics = {
      'client_work': {'train': {'loss': 1.5 - 0.2 * round_num, 'accuracy': 0.1 * round_num}}
    }
    if round_num % 2 == 0:
      metrics['evaluation'] = {'accuracy': 0.2 * round_num, 'loss': 1.3 - 0.1 * round_num}
    manager.release(metrics, round_num)


def _assert_png(path):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == _PNG_MAGIC
  width, height = struct.unpack('>II', data[16:24])  # the IHDR chunk
  assert (width, height) == (600, 400)


@pytest.mark.parametrize('name', ['metrics.jsonl', 'metrics.csv'])
def test_plot_run_writes_loss_and_accuracy_pngs(tmp_path, name):
  manager_cls = {
    'metrics.jsonl': fl.simulation.JSONLMetricsManager,
    'metrics.csv': fl.simulation.CSVMetricsManager,
  }[name]
  _write_run(manager_cls(tmp_path / name))
  paths = fl.simulation.plot_run(tmp_path)
  assert paths == [str(tmp_path / 'loss.png'), str(tmp_path / 'accuracy.png')]
  for path in paths:
    _assert_png(path)
  out = fl.simulation.plot_run(tmp_path / name, out_dir=tmp_path / 'plots')
  assert [os.path.basename(p) for p in out] == ['loss.png', 'accuracy.png']
  for path in out:
    _assert_png(path)


def test_plot_run_skips_a_figure_without_curves_and_reports_missing_input(tmp_path):
  manager = fl.simulation.JSONLMetricsManager(tmp_path / 'metrics.jsonl')
  manager.release({'client_work': {'train': {'loss': 1.0}}}, 1)
  assert fl.simulation.plot_run(tmp_path) == [str(tmp_path / 'loss.png')]
  (tmp_path / 'empty_run').mkdir()
  with pytest.raises(FileNotFoundError, match=r'without metrics\.jsonl or metrics\.csv'):
    fl.simulation.plot_run(tmp_path / 'empty_run')
  with pytest.raises(FileNotFoundError, match='does not exist'):
    fl.simulation.plot_run(tmp_path / 'missing.jsonl')
  other = fl.simulation.JSONLMetricsManager(tmp_path / 'other.jsonl')
  other.release({'throughput': 3.0}, 1)
  with pytest.raises(
    ValueError, match=r"no loss or accuracy values to plot \(1 rows; keys \['throughput'\]\)"
  ):
    fl.simulation.plot_run(tmp_path / 'other.jsonl')


class _Accountant:
  """ε = 0.5 per round, as a PrivacyAccountant's `epsilon(rounds)` reports it."""

  def epsilon(self, rounds):
    return 0.5 * rounds


def _figures(monkeypatch):
  """The figures plot_run saves, by file name (savefig still writes them)."""
  from matplotlib.figure import Figure

  saved = {}
  original = Figure.savefig

  def savefig(self, path, **kwargs):
    saved[os.path.basename(path)] = self
    return original(self, path, **kwargs)

  monkeypatch.setattr(Figure, 'savefig', savefig)
  return saved


def test_a_dp_run_gets_an_epsilon_plot_with_integer_rounds(tmp_path, monkeypatch):
  # The key the training loop releases ε under, from a run with a privacy accountant.
  process, training_selection_fn, _, _ = sp.make_problem()
  fl.simulation.run_training_process(
    process,
    training_selection_fn,
    3,
    metrics_managers=[fl.simulation.JSONLMetricsManager(tmp_path / 'metrics.jsonl')],
    privacy_accountant=_Accountant(),
  )
  saved = _figures(monkeypatch)
  paths = fl.simulation.plot_run(tmp_path)
  assert [os.path.basename(p) for p in paths] == ['loss.png', 'accuracy.png', 'epsilon.png']
  _assert_png(paths[2])
  (line,) = saved['epsilon.png'].axes[0].lines
  np.testing.assert_allclose(line.get_xydata(), [[1, 0.5], [2, 1.0], [3, 1.5]])
  for figure in saved.values():
    axes = figure.axes[0]
    ticks = [t for t in axes.get_xticks() if axes.get_xlim()[0] <= t <= axes.get_xlim()[1]]
    assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_plot_run_draws_one_metric_by_key_or_name(tmp_path, monkeypatch):
  _write_run(fl.simulation.JSONLMetricsManager(tmp_path / 'metrics.jsonl'))
  saved = _figures(monkeypatch)
  assert fl.simulation.plot_run(tmp_path, metric='evaluation/loss') == [
    str(tmp_path / 'evaluation-loss.png')
  ]
  assert [line.get_label() for line in saved['evaluation-loss.png'].axes[0].lines] == [
    'eval (evaluation/loss)'
  ]
  assert fl.simulation.plot_run(tmp_path, metric='accuracy') == [str(tmp_path / 'accuracy.png')]
  assert [line.get_label() for line in saved['accuracy.png'].axes[0].lines] == [
    'train (client_work/train/accuracy)',
    'eval (evaluation/accuracy)',
  ]
  with pytest.raises(LookupError, match=r"no metric 'f1'; the metrics are evaluation/accuracy, "):
    fl.simulation.plot_run(tmp_path, metric='f1')
