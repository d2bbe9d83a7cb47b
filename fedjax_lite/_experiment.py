"""An experiment of `fedjax-lite train` built from its settings (`fedjax_lite._config`): the
population, the model, the learning process, the per-round data and the evaluation."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

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
    model: the classifier it trains (None for matrix factorization and k-means).
    held_out_clients: `() -> FederatedData` of the held-out data as clients `{'x', 'y'}` (for
      personalization evaluation); None where the run has none.
  """

  process: LearningProcess
  train_data: data.FederatedData
  training_data_fn: Callable[[int], data.ClientBatches]
  evaluation_fn: Callable[[Any, data.ClientBatches], Mapping[str, Any]]
  evaluation_data: data.ClientBatches
  privacy_accountant: aggregators.PrivacyAccountant | None = None
  cohort_ids_fn: Callable[[int], list] | None = None
  model: models.FunctionalModel | None = None
  held_out_clients: Callable[[], data.FederatedData] | None = None


def _partition(config: Mapping[str, Any], labels: np.ndarray) -> list[np.ndarray]:
  n = config['num_clients']
  if n > len(labels):
    raise ConfigError(f'{flag("num_clients")}: {n} clients exceed the {len(labels)} examples')
  try:
    return _catalogue.PARTITIONS[config['partition']].build(config, labels)
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


class _Data(NamedTuple):
  """A classification dataset as `train` uses it: clients of `{'x', 'y'}` as the model takes
  them, the held-out clients and their examples as one array each, and the classes."""

  train: data.FederatedData
  held_out: Callable[[], data.FederatedData]
  test_arrays: dict[str, np.ndarray]
  num_classes: int


def _load(config: Mapping[str, Any]) -> _Data:
  """The training population and held-out data of `--dataset`: an `'arrays'` dataset's
  training examples split by `--partition` into `--num-clients` clients (its test examples, by
  the same partition, are the held-out clients); a federated one's own clients."""
  info = data.get_dataset(config['dataset'])
  if info.models != 'classifier':
    tip = (
      f'pass {flag("model")} mf with {flag("algorithm")} fedrecon'
      if info.models == 'mf'
      else f'train it with {flag("task")} (fedjax-lite datasets lists the tasks)'
    )
    raise ConfigError(f'{flag("dataset")}: {info.name} is not a classification dataset; {tip}')
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
    train = _clients(x_train, y_train, _partition(config, y_train))

    def held_out():
      clients = min(config['num_clients'], max(len(y_test) // 10, 1))  # 10 examples or more
      return _clients(x_test, y_test, _partition({**config, 'num_clients': clients}, y_test))

    return _Data(train, held_out, {'x': x_test, 'y': y_test}, num_classes)

  def to_model_input(client):
    client = info.input_fn(client) if info.input_fn is not None else client
    return {'x': _as_model_input(model, client['x']), 'y': client['y']}

  train, test = _read(info, config['data_path'])
  train, test = train.preprocess_client(to_model_input), test.preprocess_client(to_model_input)
  held_out, test_arrays = _held_out(test)
  try:
    data.check_labels(
      test_arrays['y'], info.num_classes, f'the held-out test clients of {info.name}'
    )
  except ValueError as error:
    raise ConfigError(f'{flag("dataset")}: {error}') from None
  return _Data(train, lambda: held_out, test_arrays, info.num_classes)


def _held_out(test: data.FederatedData) -> tuple[data.FederatedData, dict[str, np.ndarray]]:
  """At most EVAL_CLIENTS of `test`'s clients, and their examples as one array each; the same
  whatever the run's seed, so runs with other seeds (a sweep) are scored on the same clients."""
  ids = np.random.default_rng(0).choice(
    test.num_clients, min(EVAL_CLIENTS, test.num_clients), replace=False
  )
  ids = [test.client_ids[i] for i in np.sort(ids)]
  held_out = data.InMemoryFederatedData(dict(zip(ids, test.get_clients(ids), strict=True)))
  return held_out, {k: np.concatenate([c[k] for _, c in held_out]) for k in ('x', 'y')}


def _task(config: Mapping[str, Any]) -> tuple[_Data, models.FunctionalModel]:
  """`--task`'s data (TFF's files, or with `--stand-in` its generated stand-in of
  `--num-clients` clients) and model."""
  try:
    task = _catalogue.TASKS.entry(config['task']).build()
  except ValueError as error:
    raise ConfigError(f'{flag("task")}: {error}') from None
  if config['stand_in']:
    loaded = task.stand_in(config['num_clients'], seed=config['seed'])
  else:
    missing = task.missing(config['data_path'])
    if missing:
      where = flag('task') if config['data_path'] is None else flag('data_path')
      raise ConfigError(
        f'{where}: {task.name} misses ' + '; '.join(missing) + f'. Tip: pass {flag("data_path")} '
        f'DIR holding them (or set $FEDJAX_LITE_DATA_DIR), or {flag("stand_in")} to train on '
        'generated stand-in data'
      )
    loaded = task.load(config['data_path'], seed=config['seed'])
  held_out, test_arrays = _held_out(loaded.test)
  data_ = _Data(loaded.train, lambda: held_out, test_arrays, task.num_outputs)
  return data_, _mixed_precision(config, task.model(config['seed']))


def _clients(x: np.ndarray, y: np.ndarray, parts: list[np.ndarray]) -> data.FederatedData:
  return data.InMemoryFederatedData({i: {'x': x[p], 'y': y[p]} for i, p in enumerate(parts)})


def _model(config: Mapping[str, Any], example_x: np.ndarray, num_classes: int):
  try:
    build = _catalogue.MODELS.entry(config['model']).build
    model = build(example_x.shape[1:], num_classes, config['seed'])
  except ValueError as error:
    raise ConfigError(f'{flag("model")}: {error}') from None
  return _mixed_precision(config, model)


def _mixed_precision(config: Mapping[str, Any], model: models.FunctionalModel):
  """`model` computing in `--compute-dtype` (float32 master weights and sums)."""
  if config['compute_dtype'] == 'float32':
    return model
  return models.with_compute_dtype(model, config['compute_dtype'])


def _aggregator(config: Mapping[str, Any]) -> Any:
  """The model-update aggregation factory of `--aggregator` and its settings."""
  unweighted = _catalogue.ALGORITHMS.entry(config['algorithm']).unweighted
  try:
    return _catalogue.AGGREGATORS[config['aggregator']].build(config, unweighted)
  except ValueError as error:
    raise ConfigError(f'{flag("aggregator")} {config["aggregator"]}: {error}') from None


def _accountant(config: Mapping[str, Any], population: int):
  """The privacy accountant of a private aggregator (None otherwise); refuses a δ of at least
  1 / population and an ε budget below one round's ε."""
  accountant = _catalogue.AGGREGATORS[config['aggregator']].accountant
  try:
    return accountant(config, population) if accountant is not None else None
  except ValueError as error:
    raise ConfigError(str(error)) from None


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


def _min_separation(config: Mapping[str, Any]) -> int:
  """The schedule's min separation: `--min-separation` where the aggregator reads it, else 1."""
  reads = _catalogue.AGGREGATORS.reads(config['aggregator'])
  return config['min_separation'] if 'min_separation' in reads else 1


def _check_cohort(config: Mapping[str, Any], train: data.FederatedData) -> None:
  """Raises ConfigError for a cohort the population (or its min-separation groups) cannot
  fill."""
  if config['clients_per_round'] > train.num_clients:
    raise ConfigError(
      f'{flag("clients_per_round")}: {config["clients_per_round"]} exceeds the '
      f'{train.num_clients} training clients'
    )
  groups = _min_separation(config)  # a cohort comes from one of this many client groups
  if config['clients_per_round'] > train.num_clients // groups:
    raise ConfigError(
      f'{flag("clients_per_round")} {config["clients_per_round"]} exceeds the '
      f'{train.num_clients // groups} clients of the smallest of {groups} groups that '
      f'{flag("min_separation")} {groups} draws cohorts from (a client at most once in any '
      f'{groups} rounds). Tip: lower {flag("clients_per_round")} or {flag("min_separation")}.'
    )


def build_experiment(config: Mapping[str, Any], *, multihost: bool = False) -> Experiment:
  """The experiment of a resolved configuration (`fedjax_lite._config.resolve`).

  With `multihost` (after `simulation.multihost.initialize()`), the round is sharded over every
  device of every process and each process batches only its block of each cohort.
  """
  mesh = multihost_lib.global_mesh() if multihost else None
  try:
    _catalogue.check_settings(config, set())
  except ValueError as error:
    raise ConfigError(str(error)) from None
  try:
    algorithm = _catalogue.ALGORITHMS.entry(config['algorithm'])
  except ValueError as error:
    raise ConfigError(f'{flag("algorithm")}: {error}') from None
  if (config['model'] == 'mf') != (algorithm.model == 'mf'):
    raise ConfigError(
      f'{flag("model")} mf and {flag("algorithm")} fedrecon go together (matrix factorization '
      f'with local user embeddings); got model={config["model"]}, '
      f'algorithm={config["algorithm"]}. Tip: see examples/fedrecon_movielens.py'
    )
  num_classes, model, loaded = None, None, None
  if config['model'] == 'mf':
    train, test, process, evaluation = _fed_recon(config, mesh)
    _check_cohort(config, train)
    evaluation_data = data.batch_cohort(
      test, test.client_ids, batch_size=config['batch_size'], seed=config['seed']
    )
  else:
    if config['task'] is not None:
      loaded, model = _task(config)
    else:
      loaded = _load(config)
      model = _model(config, loaded.test_arrays['x'], loaded.num_classes)
    train, test_arrays = loaded.train, loaded.test_arrays
    _check_cohort(config, train)
    num_classes = None if config['task'] is not None else loaded.num_classes
    inputs = _catalogue.BuildInputs(
      model, _aggregator(config), mesh, train.num_clients, client_chunk_size(config)
    )
    try:
      process = algorithm.build(config, inputs)
    except ValueError as error:
      raise ConfigError(f'{flag("algorithm")}: {error}') from None
    evaluated = model
    if algorithm.evaluation_model is not None:  # e.g. k-means: no classes, labels unread
      evaluated, model = algorithm.evaluation_model(config, model), None
      test_arrays = {**test_arrays, 'y': np.zeros_like(test_arrays['y'])}
    evaluation = algorithms.build_fed_eval(evaluated, client_chunk_size=client_chunk_size(config))
    evaluation_data = data.build_client_batches(
      [test_arrays], batch_size=min(EVAL_BATCH_SIZE, len(test_arrays['y'])), shuffle=False
    )
  longest = data.client_steps(
    int(train.client_sizes.max()), config['epochs'], config['batch_size'], config['max_steps']
  )
  buckets = data.step_buckets(longest, 4)
  if config['task'] is not None:  # its preprocessing makes rows: the stored sizes do not bound
    buckets = tuple(2**k for k in range(31))  # compiles once per power of two reached

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
      train.num_clients,
      config['clients_per_round'],
      round_num,
      seed=config['seed'],
      min_separation=_min_separation(config),
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
    model,
    loaded.held_out if model is not None else None,
  )
