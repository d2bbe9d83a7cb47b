"""The command's registries: an entry with a setting of its own, registered once, reaches the
flags, the TOML file, the checks and sweeps; import paths plug in your own algorithm."""

import json

import jax
import numpy as np
import optax
import pytest

import fedjax_lite as fl
from fedjax_lite import _catalogue, _config, cli
from fedjax_lite._options import Option, non_negative, positive

SMALL = ['--rounds', '2', '--eval-every', '2', '--clients-per-round', '5', '--model', 'logreg']


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)


def _pulled_fedavg(config, inputs):
  """FedProx under another name, its strength read from the entry's own setting `pull`."""
  return fl.algorithms.build_weighted_fed_prox(
    inputs.model,
    config['pull'],
    _catalogue.optimizer(config, 'client'),
    _catalogue.optimizer(config, 'server'),
    model_aggregator=inputs.aggregator,
    client_chunk_size=inputs.client_chunk_size,
    seed=config['seed'],
  )


@pytest.fixture
def registered():
  """A new algorithm and a new aggregator, each with a setting of its own; removed after."""
  algorithm = _catalogue.Algorithm(
    name='pulled',
    description='FedAvg pulled towards the server model',
    build=_pulled_fedavg,
    reads=('client_optimizer', 'client_lr', 'server_optimizer', 'server_lr'),
    settings=(
      Option('pull', non_negative, 0.0, 'pull strength', ('client_work', 'proximal_strength')),
    ),
  )
  aggregator = _catalogue.Aggregator(
    name='tight_clip',
    description='clipping to a norm of its own',
    build=lambda config, unweighted: fl.aggregators.clipping_factory(
      config['tight_norm'], fl.aggregators.MeanFactory()
    ),
    settings=(Option('tight_norm', positive, 1.0, 'its clip'),),
  )
  _catalogue.ALGORITHMS.register(algorithm)
  try:
    _catalogue.AGGREGATORS.register(aggregator)
    try:
      yield
    finally:
      _catalogue.AGGREGATORS.unregister('tight_clip')
  finally:
    _catalogue.ALGORITHMS.unregister('pulled')


def _weights(run_dir):
  return jax.tree.leaves(fl.simulation.load_run(run_dir).model_weights.trainable)


def test_a_registered_entry_reaches_the_flags_toml_and_checks(registered, tmp_path, capsys):
  assert '--pull' in cli.build_parser()._subparsers._group_actions[0].choices['train'].flags
  argv = ['train', *SMALL, '--quiet', '--algorithm', 'pulled']
  assert cli.main([*argv, '--pull', '0.5', '--out', 'flag']) == 0
  assert json.loads((tmp_path / 'flag' / 'config.json').read_text())['pull'] == 0.5
  (tmp_path / 'run.toml').write_text('algorithm = "pulled"\npull = 0.5\n')
  assert cli.main(['train', *SMALL, '--quiet', '--config', 'run.toml', '--out', 'toml']) == 0
  for a, b in zip(_weights('flag'), _weights('toml'), strict=True):
    np.testing.assert_array_equal(a, b)
  assert cli.main([*argv, '--pull', '0', '--out', 'zero']) == 0
  assert cli.main(['train', *SMALL, '--quiet', '--out', 'fedavg']) == 0
  pulled, plain = _weights('zero'), _weights('fedavg')  # pull 0 is FedAvg
  for a, b in zip(pulled, plain, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert any(not np.allclose(a, b) for a, b in zip(_weights('flag'), plain, strict=True))

  assert cli.main(['train', *SMALL, '--pull', '0.5', '--out', 'bad']) == 2
  err = capsys.readouterr().err
  assert (
    '--pull does not apply to --algorithm fedavg' in err and 'goes with --algorithm pulled' in err
  )
  assert cli.main([*argv, '--pull', '-1', '--out', 'bad']) == 2
  assert '--pull: expected a number >= 0; got' in capsys.readouterr().err


def test_a_registered_aggregator_setting_reaches_its_builder(registered, capsys):
  argv = ['train', *SMALL, '--rounds', '1', '--quiet', '--aggregator', 'tight_clip']
  assert cli.main([*argv, '--tight-norm', '1e-6', '--out', 'tight']) == 0
  run = fl.simulation.load_run('tight')
  initial = run.process.get_model_weights(run.process.initialize()).trainable
  moved = optax.tree.norm(jax.tree.map(lambda a, b: a - b, run.model_weights.trainable, initial))
  assert 0 < float(moved) <= 1e-6 * 1.0001  # the server moves by the clipped mean (lr 1)
  assert cli.main(['train', *SMALL, '--tight-norm', '1', '--out', 'bad']) == 2
  assert 'goes with --aggregator tight_clip' in capsys.readouterr().err


def test_a_registered_setting_with_an_hparam_is_swept_inside_one_program(
  registered, tmp_path, capsys
):
  assert _config.in_program()['pull'] == ('client_work', 'proximal_strength')
  (tmp_path / 'grid.toml').write_text(
    'rounds = 2\neval_every = 2\nclients_per_round = 5\nmodel = "logreg"\n'
    'algorithm = "pulled"\npull = [0.0, 0.5]\n'
  )
  assert cli.main(['sweep', '--config', 'grid.toml', '--out', 'sw']) == 0
  assert 'sweep of 2 runs (pull) as 1 program;' in capsys.readouterr().out
  swept = _weights('sw/pull=0.5')
  assert cli.main(['train', *SMALL, '--quiet', '--algorithm', 'pulled', '--pull', '0.5']) == 0
  alone = _weights('runs/digits-logreg-pulled')
  for a, b in zip(swept, alone, strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_registering_a_taken_name_or_a_clashing_setting_is_refused():
  with pytest.raises(ValueError, match="algorithm 'fedavg' is already registered"):
    _catalogue.ALGORITHMS.register(_catalogue.ALGORITHMS['fedavg'])
  clash = _catalogue.Aggregator(
    name='other', description='', build=None, settings=(Option('bits', positive, 3.0, ''),)
  )
  with pytest.raises(ValueError, match="declares setting 'bits', which another entry"):
    _catalogue.AGGREGATORS.register(clash)
  unknown = _catalogue.Aggregator(name='other', description='', build=None, reads=('nope',))
  with pytest.raises(ValueError, match=r"reads \['nope'\], which are not shared"):
    _catalogue.AGGREGATORS.register(unknown)


def test_your_own_algorithm_trains_from_the_command_by_import_path(tmp_path, capsys):
  (tmp_path / 'my_algorithms_for_cli.py').write_text(
    'import fedjax_lite as fl\n'
    'def unweighted(settings, inputs):\n'
    '  return fl.algorithms.build_unweighted_fed_avg(\n'
    '    inputs.model, fl.optimizers.build_sgdm(settings["client_lr"]),\n'
    '    fl.optimizers.build_sgdm(settings["server_lr"]), seed=settings["seed"])\n'
    'def broken(settings, inputs):\n'
    '  return "not a process"\n'
  )
  argv = ['train', *SMALL, '--quiet']
  assert cli.main([*argv, '--algorithm', 'my_algorithms_for_cli:unweighted', '--out', 'a']) == 0
  assert cli.main([*argv, '--algorithm', 'fedavg_unweighted', '--out', 'b']) == 0
  for a, b in zip(_weights('a'), _weights('b'), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert cli.main([*argv, '--algorithm', 'my_algorithms_for_cli:broken', '--out', 'c']) == 2
  err = capsys.readouterr().err
  assert 'must return a fl.templates.LearningProcess; got str' in err, err


def test_federated_kmeans_trains_from_the_command(capsys):
  argv = ['train', '--algorithm', 'fed_kmeans', '--clusters', '8', '--rounds', '4']
  assert cli.main([*argv, '--eval-every', '4', '--quiet', '--out', 'km']) == 0
  run = fl.simulation.load_run('km')
  assert run.model_weights.trainable.shape == (8, 64)  # 8 centroids of the 8x8 digits
  losses = [run.metrics[r]['evaluation/loss'] for r in (0, 4)]
  assert losses[1] < 0.5 * losses[0]  # mean squared distance to the nearest centroid
  assert cli.main(['train', '--clusters', '8', '--out', 'bad']) == 2
  assert 'goes with --algorithm fed_kmeans' in capsys.readouterr().err
  assert cli.main([*argv, '--aggregator', 'median', '--out', 'bad']) == 2
  assert '--algorithm fed_kmeans sums points per cluster' in capsys.readouterr().err


def test_eval_personalize_fine_tunes_each_held_out_client_as_a_plain_loop_does(capsys):
  assert cli.main(['train', *SMALL, '--rounds', '3', '--quiet', '--out', 'run']) == 0
  capsys.readouterr()
  argv = ['eval', 'run', '--personalize', '--fine-tune-epochs', '1', '--fine-tune-lr', '0.05']
  assert cli.main(argv) == 0
  out = capsys.readouterr().out
  rows = {line.split()[0]: line.split()[1:] for line in out.splitlines() if line.startswith('  ')}
  # A plain loop: each client's shuffled examples split in halves; one SGD step (one batch).
  run = fl.simulation.load_run('run')
  model, weights = run.model, run.model_weights
  rng = np.random.default_rng(0)
  right = {'baseline': 0, 'tuned': 0}
  total = 0
  for _, client in run.held_out_clients():
    order = rng.permutation(len(client['y']))
    tune, test = np.split(order, [round(len(order) / 2)])

    def loss(trainable, tune=tune, client=client):
      out = model.predict_on_batch(fl.ModelWeights(trainable, ()), client['x'][tune])
      return model.loss(out, client['y'][tune])

    tuned = jax.tree.map(
      lambda w, g: w - 0.05 * g, weights.trainable, jax.grad(loss)(weights.trainable)
    )
    for name, trainable in [('baseline', weights.trainable), ('tuned', tuned)]:
      logits = model.predict_on_batch(fl.ModelWeights(trainable, ()), client['x'][test], False)
      right[name] += int(np.sum(np.argmax(logits, -1) == client['y'][test]))
    total += len(test)
  assert float(rows['baseline_metrics'][0]) == pytest.approx(right['baseline'] / total, abs=1e-4)
  assert float(rows['sgd_1_epochs'][0]) == pytest.approx(right['tuned'] / total, abs=1e-4)


def test_a_task_trains_from_the_command_with_its_defaults_data_and_metrics(tmp_path, capsys):
  task = fl.tasks.get_task('stackoverflow_tag')
  task.write_stand_in(tmp_path / 'files', num_clients=4, seed=0)  # TFF's files, generated
  argv = ['train', '--task', 'stackoverflow_tag', '--rounds', '2', '--eval-every', '1']
  argv += ['--clients-per-round', '2', '--quiet']
  assert cli.main([*argv, '--data-path', str(tmp_path / 'files'), '--out', 'files']) == 0
  config = json.loads((tmp_path / 'files' / 'config.json').read_text())
  for key in ('batch_size', 'client_lr', 'server_optimizer', 'server_lr', 'epochs'):
    assert config[key] == task.defaults[key], key  # Reddi et al.'s, not the command's
  row = json.loads((tmp_path / 'files' / 'metrics.jsonl').read_text().splitlines()[-1])
  for name in ('precision', 'recall_at_5', 'loss'):
    assert f'evaluation/{name}' in row and f'client_work/train/{name}' in row, sorted(row)
  # The files hold the stand-in's clients (in TFF's sorted order), read to the same arrays.
  assert cli.main([*argv, '--stand-in', '--num-clients', '4', '--out', 'stand_in']) == 0
  read, generated = task.load(tmp_path / 'files').train, task.stand_in(4, seed=0).train
  assert sorted(read.client_ids) == sorted(generated.client_ids)
  for client_id in read.client_ids:
    a, b = read.get_clients([client_id])[0], generated.get_clients([client_id])[0]
    for key in ('x', 'y'):
      np.testing.assert_array_equal(a[key], b[key])

  for extra, message in [
    (['--dataset', 'digits'], '--dataset: --task stackoverflow_tag brings its own data'),
    (['--data-path', str(tmp_path)], 'stackoverflow_train.h5: not in'),
  ]:
    assert cli.main([*argv, *extra, '--out', 'bad']) == 2
    err = capsys.readouterr().err
    assert message in err and err.count('\n') == 1, err
  assert cli.main(['train', '--stand-in', '--out', 'bad']) == 2
  assert '--stand-in goes with --task' in capsys.readouterr().err


def test_your_own_task_trains_from_the_command_by_import_path(tmp_path, capsys):
  (tmp_path / 'my_tasks_for_cli.py').write_text(
    'import fedjax_lite as fl\n'
    'def small_tags():\n'
    '  return fl.tasks.stackoverflow_tag(word_vocab_size=50, tag_vocab_size=7)\n'
  )
  argv = ['train', '--task', 'my_tasks_for_cli:small_tags', '--stand-in', '--rounds', '1']
  assert cli.main([*argv, '--clients-per-round', '2', '--num-clients', '3', '--quiet']) == 0
  run = fl.simulation.load_run('runs/my_tasks_for_cli.small_tags-fedavg')
  assert sorted(w.shape for w in jax.tree.leaves(run.model_weights.trainable)) == [(7,), (50, 7)]


@pytest.mark.parametrize(
  'argv, message',
  [
    (['--task', 'no_such_module_here:build'], '--task: no_such_module_here:build: cannot import'),
    (
      ['--dataset', 'synthetic_1_1', '--alpha', '0.1'],
      '--alpha: --dataset synthetic_1_1 is federated',
    ),
    (
      ['--task', 'stackoverflow_tag', '--num-clients', '9'],
      '--num-clients: --task stackoverflow_tag',
    ),
    (
      ['--task', 'emnist_character', '--server-optimizer', 'adam'],
      "--task: server_optimizer 'adam' is adaptive",
    ),
    (['--task', 'emnist_character', '--stand-in', '--data-path', 'x'], '--data-path: --stand-in'),
    (['--algorithm', 'fed_kmeans', '--task', 'emnist_character'], 'clusters a dataset'),
  ],
)
def test_settings_a_choice_does_not_use_are_one_line_errors(argv, message, capsys):
  assert cli.main(['train', *argv, '--rounds', '1', '--out', 'bad']) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.splitlines()) == 1, err


def test_a_toml_list_where_a_name_goes_is_a_one_line_error(tmp_path, capsys):
  (tmp_path / 'run.toml').write_text('algorithm = ["fedavg"]\n')
  assert cli.main(['train', '--config', 'run.toml', '--out', 'bad']) == 2
  err = capsys.readouterr().err
  assert "algorithm: unknown name ['fedavg']" in err and len(err.splitlines()) == 1, err


def test_a_task_with_a_server_optimizer_takes_the_papers_rates_for_it():
  config = _config.resolve({'task': 'emnist_character', 'server_optimizer': 'sgd'})
  config = _catalogue.with_defaults(config, {'task', 'server_optimizer'})
  tuned = fl.tasks.get_task('emnist_character').tuned['sgd']  # FedAvg's row, not FedAvgM's
  assert (config['client_lr'], config['server_lr']) == (tuned['client_lr'], tuned['server_lr'])
