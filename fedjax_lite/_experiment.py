"""An experiment of `fedjax-lite train` built from its settings (`fedjax_lite._config`): the
population, the model, the learning process, the per-round data and the evaluation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from fedjax_lite import (
  _catalogue,
  aggregators,
  algorithms,
  data,
  models,
  optimizers,
  reconstruction,
  simulation,
)
from fedjax_lite._config import ConfigError, flag
from fedjax_lite.simulation import multihost as multihost_lib
from fedjax_lite.templates import LearningProcess

EVAL_BATCH_SIZE = 256
EVAL_CLIENTS = 100  # test clients evaluated for a naturally federated dataset
MF_DIM = 50  # embedding size of the matrix factorization (Singhal et al., 2021)
MF_EVAL_RECON_EPOCHS = 5


@dataclasses.dataclass(frozen=True)
class Experiment:
  """What `run_training_process` needs.

  Attributes:
    process: the learning process.
    train_data: the training population.
    training_data_fn: `round_num -> ClientBatches` (host arrays) of that round's cohort.
    evaluation_fn: `(state, ClientBatches) -> metrics`.
    evaluation_data: the held-out `ClientBatches`.
    privacy_accountant: a `PrivacyAccountant` when the aggregation is differentially private.
    cohort_ids_fn: `round_num -> the ids of that round's clients`, in the order of
      `training_data_fn(round_num)` (for the client-state store of a stateful process).
  """

  process: LearningProcess
  train_data: data.FederatedData
  training_data_fn: Callable[[int], data.ClientBatches]
  evaluation_fn: Callable[[Any, data.ClientBatches], Mapping[str, Any]]
  evaluation_data: data.ClientBatches
  privacy_accountant: aggregators.PrivacyAccountant | None = None
  cohort_ids_fn: Callable[[int], list] | None = None


def _partition(config: Mapping[str, Any], labels: np.ndarray) -> list[np.ndarray]:
  n, seed = config['num_clients'], config['seed']
  if n > len(labels):
    raise ConfigError(f'{flag("num_clients")}: {n} clients exceed the {len(labels)} examples')
  try:
    if config['partition'] == 'dirichlet':
      return data.dirichlet_label_partition(labels, n, config['alpha'], seed=seed)
    if config['partition'] == 'iid':
      return data.iid_partition(len(labels), n, seed=seed)
    if config['partition'] == 'shards':
      return data.label_shards_partition(labels, n, shards_per_client=2, seed=seed)
    return data.power_law_partition(len(labels), n, seed=seed)
  except ValueError as error:  # a split these examples cannot make
    raise ConfigError(
      f'{flag("partition")} {config["partition"]} with {flag("num_clients")} {n}: {error}'
    ) from None


def _as_model_input(model: str, x: np.ndarray) -> np.ndarray:
  """`x [n, ...]` flat for logreg/mlp, `[n, side, side, 1]` for the CNN."""
  x = x.reshape(len(x), -1).astype(np.float32)
  if model != 'cnn':
    return x
  side = math.isqrt(x.shape[1])
  if side * side != x.shape[1]:
    raise ConfigError(f'{flag("model")}: cnn needs square images; got {x.shape[1]} features')
  return x.reshape(len(x), side, side, 1)


def _check_available(info: data.DatasetInfo, path: str | None) -> None:
  """Raises ConfigError naming the user's `--data-path` (or the default source) when the
  dataset's files are not there."""
  if info.available(path):
    return
  if path is not None:
    raise ConfigError(
      f'{flag("data_path")}: {path!r} does not hold the {info.name} data (expected {info.source})'
    )
  raise ConfigError(
    f'{flag("dataset")}: {info.name} is not available here ({info.source}); {info.how_to_get}'
  )


def _read(info: data.DatasetInfo, path: str | None) -> Any:
  """`info.load(path)`; files that are there but cannot be read are a ConfigError naming them."""
  try:
    return info.load(path)
  except (ValueError, KeyError, OSError) as error:
    where = f'{flag("data_path")} {path!r}' if path is not None else f'{flag("dataset")}'
    raise ConfigError(f'{where}: cannot read the {info.name} data: {error}') from None


def _load(config: Mapping[str, Any]) -> tuple[data.FederatedData, dict[str, np.ndarray], int]:
  """`(train population {'x', 'y'}, test arrays {'x', 'y'}, num_classes)`."""
  info = data.get_dataset(config['dataset'])
  _check_available(info, config['data_path'])
  model = config['model']
  if info.kind == 'arrays':
    (x_train, y_train), (x_test, y_test) = _read(info, config['data_path'])
    x_train, x_test = _as_model_input(model, x_train), _as_model_input(model, x_test)
    num_classes = int(max(y_train.max(), y_test.max())) + 1
    for name, labels in [('training', y_train), ('test', y_test)]:
      try:
        data.check_labels(labels, num_classes, f'the {name} set of {info.name}')
      except (TypeError, ValueError) as error:
        raise ConfigError(f'{flag("dataset")}: {error}') from None
    parts = _partition(config, y_train)
    train = data.InMemoryFederatedData(
      {i: {'x': x_train[p], 'y': y_train[p]} for i, p in enumerate(parts)}
    )
    return train, {'x': x_test, 'y': y_test}, num_classes
  if info.num_classes is not None:  # clients hold {'x', 'y'}; every test client evaluates
    train, test = _read(info, config['data_path'])
    train = train.preprocess_client(
      lambda client: {'x': _as_model_input(model, client['x']), 'y': client['y']}
    )
    test_clients = test.get_clients(test.client_ids)
    test_arrays = {
      'x': _as_model_input(model, np.concatenate([c['x'] for c in test_clients])),
      'y': np.concatenate([c['y'] for c in test_clients]),
    }
    return train, test_arrays, info.num_classes
  if info.name not in ('emnist', 'emnist_digits'):
    raise ConfigError(
      f'{flag("dataset")}: the command has no model for {info.name}; train it through the '
      'library API (fl.data.get_dataset), or pick an image dataset'
    )
  train, test = _read(info, config['data_path'])

  def to_model_input(client):
    return {'x': _as_model_input(model, client['pixels']), 'y': client['label'].astype(np.int32)}

  train = train.preprocess_client(to_model_input)
  test = test.preprocess_client(to_model_input)
  # The held-out clients do not follow the run's seed: runs with other seeds (a sweep) are
  # scored on the same clients.
  rng = np.random.default_rng(0)
  ids = rng.choice(test.num_clients, min(EVAL_CLIENTS, test.num_clients), replace=False)
  held_out = test.get_clients([test.client_ids[i] for i in np.sort(ids)])
  test_arrays = {k: np.concatenate([c[k] for c in held_out]) for k in ('x', 'y')}
  num_classes = 10 if info.name == 'emnist_digits' else 62
  try:
    data.check_labels(test_arrays['y'], num_classes, f'the held-out test clients of {info.name}')
  except ValueError as error:
    raise ConfigError(f'{flag("dataset")}: {error}') from None
  return train, test_arrays, num_classes


def _model(config: Mapping[str, Any], example_x: np.ndarray, num_classes: int):
  try:
    build = _catalogue.classifier(config['model'])
    model = build(example_x.shape[1:], num_classes, config['seed'])
  except ValueError as error:
    raise ConfigError(f'{flag("model")}: {error}') from None
  return _mixed_precision(config, model)


def _mixed_precision(config: Mapping[str, Any], model: models.FunctionalModel):
  """`model` computing in `--compute-dtype` (float32 master weights and sums)."""
  if config['compute_dtype'] == 'float32':
    return model
  return models.with_compute_dtype(model, config['compute_dtype'])


def check_aggregator_settings(config: Mapping[str, Any]) -> None:
  """Raises ConfigError for aggregator settings that do not go together."""
  name = config['aggregator']
  dp_only = [k for k in ('noise_multiplier', 'target_delta', 'epsilon_budget') if config[k]]
  if name == 'dp' and config['noise_multiplier'] is None:
    raise ConfigError(
      f'{flag("aggregator")} dp needs {flag("noise_multiplier")} (the noise standard deviation '
      'over the clip; 0 for clipping without noise)'
    )
  if name != 'dp' and dp_only:
    verb = 'goes' if len(dp_only) == 1 else 'go'
    raise ConfigError(
      f'{", ".join(flag(k) for k in dp_only)} {verb} with {flag("aggregator")} dp; got '
      f'{flag("aggregator")} {name}'
    )
  if config['bits'] != 8 and name != 'compression':
    raise ConfigError(
      f'{flag("bits")} goes with {flag("aggregator")} compression; got {flag("aggregator")} {name}'
    )
  if config['clip'] is not None and name not in ('clip', 'dp'):
    raise ConfigError(
      f'{flag("clip")} goes with {flag("aggregator")} clip or dp; got {flag("aggregator")} {name}'
    )
  if name == 'dp' and config['epsilon_budget'] and not config['noise_multiplier']:
    raise ConfigError(f'{flag("epsilon_budget")} needs a {flag("noise_multiplier")} > 0')


def _aggregator(config: Mapping[str, Any]) -> Any:
  """The model-update aggregation factory of `--aggregator` and its settings."""
  name, clip = config['aggregator'], config['clip']
  unweighted = _catalogue.ALGORITHMS[config['algorithm']].unweighted
  mean = aggregators.UnweightedMeanFactory() if unweighted else aggregators.MeanFactory()
  try:
    if name == 'robust':
      return aggregators.robust_aggregator(weighted=not unweighted)
    if name == 'clip':
      if clip is None:
        return aggregators.default_clipping(mean)
      return aggregators.clipping_factory(clip, mean)
    if name == 'zero':
      return aggregators.default_zeroing(mean)
    if name == 'secure':
      return aggregators.secure_aggregator(weighted=not unweighted)
    if name == 'compression':
      return aggregators.compression_aggregator(weighted=not unweighted, bits=config['bits'])
    if name == 'dp':  # the run's seed keys the noise: each seed of a sweep draws its own
      noise, cohort, seed = config['noise_multiplier'], config['clients_per_round'], config['seed']
      if clip is None:
        _check_adaptive_clip(noise, cohort)
        return aggregators.dp_aggregator(noise, cohort, seed=seed)
      return aggregators.DifferentiallyPrivateFactory.gaussian_fixed(noise, cohort, clip, seed)
    if name == 'median':
      return aggregators.median_factory()
    if name == 'trimmed_mean':
      return aggregators.trimmed_mean_factory(config['trim_fraction'])
    if name == 'krum':
      cohort = config['clients_per_round']
      _check_krum(config['byzantine'], cohort)
      return aggregators.krum_factory(config['byzantine'], clients_per_round=cohort)
  except ConfigError:
    raise
  except ValueError as error:
    raise ConfigError(f'{flag("aggregator")} {name}: {error}') from None
  return mean


def _check_krum(byzantine: int, cohort: int) -> None:
  """Raises ConfigError when `cohort` clients a round cannot meet Krum's guarantee for
  `byzantine` clients (more than 2 x byzantine + 2; Blanchard et al., 2017)."""
  if cohort <= 2 * byzantine + 2:
    lower = f' or lower {flag("byzantine")} to {(cohort - 3) // 2}' if cohort >= 3 else ''
    raise ConfigError(
      f'{flag("aggregator")} krum with {flag("byzantine")} {byzantine} needs more than '
      f'{2 * byzantine + 2} clients a round (2 x byzantine + 2); got '
      f'{flag("clients_per_round")} {cohort}. Tip: raise {flag("clients_per_round")} to '
      f'{2 * byzantine + 3}{lower}.'
    )


def _check_adaptive_clip(noise: float, cohort: int) -> None:
  """Raises ConfigError when the adaptive clip cannot keep the total noise multiplier at `noise`
  with `cohort` clients a round (its count's noise, 0.05 · cohort, must exceed noise / 2)."""
  if noise and not 2 * (0.05 * cohort) > noise:  # as gaussian_adaptive computes it
    raise ConfigError(
      f'{flag("aggregator")} dp with the adaptive clip (no {flag("clip")}) needs more than '
      f'{10 * noise:g} clients a round for {flag("noise_multiplier")} {noise:g} (10 per unit of '
      f'noise: counting the clipped clients takes a share of the noise); got '
      f'{flag("clients_per_round")} {cohort}. Tip: pass a fixed clip ({flag("clip")} 1.0, '
      f'sized to the update norms), or raise {flag("clients_per_round")}.'
    )


def default_target_delta(population: int) -> float:
  """The command's δ without `--target-delta`: 0.1 / population, well below TF Privacy's
  bound δ < 1 / population (a δ near 1 / N allows a mechanism that reveals a whole client's
  data with that probability: about one of N clients; 0.1 / N, one in ten runs)."""
  return 0.1 / population


def _accountant(config: Mapping[str, Any], population: int):
  """The privacy accountant of a DP run with noise; None otherwise. Refuses a δ of at least
  1 / population and an ε budget below one round's ε."""
  if config['aggregator'] != 'dp' or not config['noise_multiplier']:
    return None
  delta = config['target_delta']
  if delta is None:
    delta = default_target_delta(population)
  elif delta >= 1 / population:
    raise ConfigError(
      f'{flag("target_delta")} {delta:g} is not below 1/{population} = {1 / population:.3g} '
      f'(1 over the {population} training clients): such a delta allows revealing a whole '
      f"client's data. Tip: pass {flag('target_delta')} {default_target_delta(population):.3g} "
      '(0.1 / clients, the default) or less.'
    )
  accountant = aggregators.PrivacyAccountant(
    config['noise_multiplier'],
    config['clients_per_round'],
    population,
    delta,
    sampling='fixed_size',  # fl.data.sample_cohort draws a fixed-size cohort without replacement
  )
  budget = config['epsilon_budget']
  if budget and accountant.epsilon(1) > budget:
    raise ConfigError(
      f'{flag("epsilon_budget")} {budget:g} is below the epsilon of one round '
      f'({accountant.epsilon(1):.4g} at delta={delta:.3g}), so no round could run. Tip: raise '
      f'{flag("epsilon_budget")} or {flag("noise_multiplier")}, or lower '
      f'{flag("clients_per_round")}.'
    )
  return accountant


def client_chunk_size(config: Mapping[str, Any]) -> int | str | None:
  """The processes' `client_chunk_size`: `--client-chunk-size`, where `--no-tune` turns
  'auto' into the backend's default (None)."""
  chunk = config['client_chunk_size']
  return None if chunk == 'auto' and config['no_tune'] else chunk


def _fed_recon(config: Mapping[str, Any], mesh: Any = None):
  """MovieLens users as clients, matrix factorization with local user embeddings.

  Returns `(train, test, process, evaluation_process)`: each user's earlier ratings train,
  their latest 20% evaluate (reconstruct on even batches, evaluate on odd ones).
  """
  if config['dataset'] != 'movielens_100k':
    raise ConfigError(
      f'{flag("model")} mf needs {flag("dataset")} movielens_100k; got {config["dataset"]}'
    )
  info = data.get_dataset('movielens_100k')
  _check_available(info, config['data_path'])
  train, test = _read(info, config['data_path'])
  num_items = 1 + max(int(c['item_id'].max()) for p in (train, test) for _, c in p)

  def to_model_input(client):
    return {'x': client['item_id'].astype(np.int32), 'y': client['rating'].astype(np.float32)}

  train, test = train.preprocess_client(to_model_input), test.preprocess_client(to_model_input)
  model = models.matrix_factorization(1, num_items, MF_DIM, personal=True, seed=config['seed'])
  model = _mixed_precision(config, model)
  local = reconstruction.ReconstructionModel(model, lambda path: 'user' in path)
  recon_optimizer = optimizers.build_sgdm(config['recon_lr'])
  process = reconstruction.build_fed_recon(
    local,
    server_optimizer=_catalogue.optimizer(config, 'server'),
    client_optimizer=_catalogue.optimizer(config, 'client'),
    reconstruction_optimizer=recon_optimizer,
    dataset_split_fn=reconstruction.build_dataset_split_fn(split_dataset=True),
    model_aggregator=_aggregator(config),
    seed=config['seed'],
    mesh=mesh,
    client_chunk_size=client_chunk_size(config),
  )
  evaluation = reconstruction.build_fed_recon_eval(
    local,
    reconstruction_optimizer=recon_optimizer,
    dataset_split_fn=reconstruction.build_dataset_split_fn(
      recon_epochs=MF_EVAL_RECON_EPOCHS, split_dataset=True
    ),
    seed=config['seed'],
    client_chunk_size=client_chunk_size(config),
  )
  return train, test, process, evaluation


def build_experiment(config: Mapping[str, Any], *, multihost: bool = False) -> Experiment:
  """The experiment of a resolved configuration (`fedjax_lite._config.resolve`).

  With `multihost` (after `simulation.multihost.initialize()`), the round is sharded over every
  device of every process and each process batches only its block of each cohort.
  """
  mesh = multihost_lib.global_mesh() if multihost else None
  check_aggregator_settings(config)
  algorithm = _catalogue.ALGORITHMS[config['algorithm']]
  if (config['model'] == 'mf') != (algorithm.model == 'mf'):
    raise ConfigError(
      f'{flag("model")} mf and {flag("algorithm")} fedrecon go together (matrix factorization '
      f'with local user embeddings); got model={config["model"]}, '
      f'algorithm={config["algorithm"]}. Tip: see examples/fedrecon_movielens.py'
    )
  num_classes = None
  if config['model'] == 'mf':
    train, test, process, evaluation = _fed_recon(config, mesh)
    evaluation_data = data.batch_cohort(
      test, test.client_ids, batch_size=config['batch_size'], seed=config['seed']
    )
  else:
    train, test_arrays, num_classes = _load(config)
    model = _model(config, test_arrays['x'], num_classes)
    inputs = _catalogue.BuildInputs(
      model, _aggregator(config), mesh, train.num_clients, client_chunk_size(config)
    )
    process = algorithm.build(config, inputs)
    evaluation = algorithms.build_fed_eval(model, client_chunk_size=client_chunk_size(config))
    evaluation_data = data.build_client_batches(
      [test_arrays], batch_size=min(EVAL_BATCH_SIZE, len(test_arrays['y'])), shuffle=False
    )
  if config['clients_per_round'] > train.num_clients:
    raise ConfigError(
      f'{flag("clients_per_round")}: {config["clients_per_round"]} exceeds the '
      f'{train.num_clients} training clients'
    )
  longest = data.client_steps(
    int(train.client_sizes.max()), config['epochs'], config['batch_size'], config['max_steps']
  )
  buckets = data.step_buckets(longest, 4)

  def batch(ids: list, round_num: int, round_buckets) -> data.ClientBatches:
    return data.batch_cohort(
      train,
      ids,
      batch_size=config['batch_size'],
      num_epochs=config['epochs'],
      max_steps=config['max_steps'],
      round_num=round_num,
      seed=config['seed'],
      buckets=round_buckets,
      num_classes=num_classes,
    )

  def sample(round_num: int) -> np.ndarray:
    return data.sample_cohort(
      train.num_clients, config['clients_per_round'], round_num, seed=config['seed']
    )

  def cohort_ids_fn(round_num: int) -> list:
    ids = [train.client_ids[i] for i in sample(round_num)]
    # Multi-process: one id per client of training_data_fn's padded cohort.
    return multihost_lib.padded_cohort_ids(ids, mesh) if multihost else ids

  def straggle(batches: data.ClientBatches, round_num: int, rows: slice) -> data.ClientBatches:
    """`batches` (rows `rows` of the cohort) with the round's stragglers' work cut."""
    if not config['stragglers']:
      return batches
    work = data.straggler_work(
      config['clients_per_round'], config['stragglers'], config['epochs'],
      round_num=round_num, seed=config['seed'],
    )  # fmt: skip
    return data.apply_straggler_work(batches, work[rows], config['straggler_policy'])

  def training_data_fn(round_num: int) -> data.ClientBatches:
    cohort = sample(round_num)
    if not multihost:
      cohort_batches = batch([train.client_ids[i] for i in cohort], round_num, buckets)
      return straggle(cohort_batches, round_num, slice(None))
    # Every process sampled the same cohort; each batches its own block, padded to the step
    # count of the cohort's longest client so that the blocks form one array.
    start, stop, padded = multihost_lib.cohort_block(len(cohort), mesh)
    steps = data.client_steps(
      int(train.client_sizes[cohort].max()), config['epochs'], config['batch_size'],
      config['max_steps'],
    )  # fmt: skip
    round_buckets = [next(b for b in buckets if b >= steps)]
    block = [train.client_ids[i] for i in cohort[start:stop]]
    local = (
      straggle(batch(block, round_num, round_buckets), round_num, slice(start, stop))
      if block
      else None
    )
    if local is None:  # a block of padding only: shapes from the cohort's first client
      local = jax.tree.map(
        np.zeros_like, batch([train.client_ids[cohort[0]]], round_num, round_buckets)
      )
    local = multihost_lib.pad_block(local, stop - start)
    # The cohort's client_ids replicated, so that every process can check cohort_ids_fn's.
    return multihost_lib.global_batches(local, padded, mesh, cohort_ids_fn(round_num))

  evaluation_fn = simulation.build_evaluation_fn(process, evaluation)
  if multihost:  # evaluation runs on each process's own copy of the (replicated) state
    distributed_evaluation_fn = evaluation_fn

    def evaluation_fn(state, evaluation_data):
      return distributed_evaluation_fn(multihost_lib.to_host(state), evaluation_data)

  return Experiment(
    process,
    train,
    training_data_fn,
    evaluation_fn,
    jax.device_put(evaluation_data),
    _accountant(config, train.num_clients),
    cohort_ids_fn,
  )
