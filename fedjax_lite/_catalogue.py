"""What `fedjax-lite train` can build, by name: optimizers and the registries of algorithms,
aggregators, partitions, models and tasks (`fedjax_lite._options.Registry`).

Each entry builds its own part and declares the settings it reads (shared ones of its registry,
and its own), so the command has no per-entry branch: adding an algorithm, an aggregator or a
partition with a setting of its own is adding an entry. A setting given for an entry that does
not read it is an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax.numpy as jnp
import optax

from fedjax_lite import aggregators, algorithms, data, models, optimizers, tasks
from fedjax_lite._options import (
  Entry,
  Option,
  Registry,
  choice,
  flag,
  int_in,
  non_negative,
  number_in,
  optional,
  positive,
)
from fedjax_lite.templates import LearningProcess

Config = Mapping[str, Any]

# name -> `(learning_rate) -> optax.GradientTransformation` (TFF's update rules).
OPTIMIZERS: Mapping[str, Callable[[float], optax.GradientTransformation]] = types.MappingProxyType(
  {
    'sgd': optimizers.build_sgdm,
    'sgdm': lambda learning_rate: optimizers.build_sgdm(learning_rate, momentum=0.9),
    'adam': optimizers.build_adam,
    'adagrad': optimizers.build_adagrad,
    'rmsprop': optimizers.build_rmsprop,
    'yogi': optimizers.build_yogi,
  }
)


def optimizer(config: Config, role: str) -> optax.GradientTransformation:
  """The `role` ('client' or 'server') optimizer: `--ROLE-optimizer` at `--ROLE-lr`."""
  return OPTIMIZERS[config[f'{role}_optimizer']](config[f'{role}_lr'])


def _classifier_entry(path: str, build: Callable) -> Entry:
  """The model of an import path: `build(input_shape, num_classes, seed)` checked to return a
  `fl.FunctionalModel`."""

  def checked(shape, num_classes, seed):
    model = build(shape, num_classes, seed)
    if not isinstance(model, models.FunctionalModel):
      raise ValueError(
        f'{path}(input_shape, num_classes, seed) must return a fl.FunctionalModel; got '
        f'{type(model).__name__}'
      )
    return model

  return Entry(name=path, description='your own model', build=checked)


# `build(input shape of one example, num_classes, seed) -> FunctionalModel` (classifiers); 'mf'
# is built with its data and algorithm (fedrecon on MovieLens).
MODELS = Registry(
  'model',
  [
    Entry(
      name='logreg',
      description='logistic regression',
      build=lambda shape, classes, seed: models.mlp_classifier(shape[0], classes, (), seed),
    ),
    Entry(
      name='mlp',
      description='two hidden layers of 200 (McMahan et al. 2017)',
      build=lambda shape, classes, seed: models.mlp_classifier(shape[0], classes, (200, 200), seed),
    ),
    Entry(
      name='cnn',
      description='two 5x5 convolutions and a dense layer (McMahan et al. 2017)',
      build=lambda shape, classes, seed: models.cnn_classifier(shape, classes, seed),
    ),
    Entry(name='mf', description='matrix factorization, local user embeddings', build=None),
  ],
  from_import=_classifier_entry,
  import_hint='(input_shape, num_classes, seed) -> fl.FunctionalModel',
)


def _partition_entry(name, description, split, settings=()):
  return Entry(name=name, description=description, build=split, settings=settings)


# `build(config, labels [n]) -> one index array per client`.
PARTITIONS = Registry(
  'partition',
  [
    _partition_entry(
      'dirichlet',
      'label skew: class shares per client drawn from Dirichlet(alpha)',
      lambda config, labels: data.dirichlet_label_partition(
        labels, config['num_clients'], config['alpha'], seed=config['seed']
      ),
      (Option('alpha', positive, 0.5, 'Dirichlet label skew (partition=dirichlet)'),),
    ),
    _partition_entry(
      'iid',
      'equal shares, examples shuffled',
      lambda config, labels: data.iid_partition(
        len(labels), config['num_clients'], seed=config['seed']
      ),
    ),
    _partition_entry(
      'shards',
      'two label-sorted shards per client (McMahan et al. 2017)',
      lambda config, labels: data.label_shards_partition(
        labels, config['num_clients'], shards_per_client=2, seed=config['seed']
      ),
    ),
    _partition_entry(
      'power_law',
      'client sizes from a power law',
      lambda config, labels: data.power_law_partition(
        len(labels), config['num_clients'], seed=config['seed']
      ),
    ),
  ],
)


class BuildInputs(NamedTuple):
  """What every algorithm is built from besides the settings.

  Attributes:
    model: the `FunctionalModel`.
    aggregator: the model-update aggregation factory of `--aggregator`.
    mesh: a `Mesh` over the processes' devices (multi-process runs), or None.
    population_size: the number of training clients.
    client_chunk_size: `'auto'` (measured), None (the backend's default) or an int.
  """

  model: models.FunctionalModel
  aggregator: Any
  mesh: Any
  population_size: int
  client_chunk_size: int | str | None = 'auto'


@dataclasses.dataclass(frozen=True, kw_only=True)
class Algorithm(Entry):
  """An algorithm: `build(config, BuildInputs) -> LearningProcess`; a stateful process
  (per-client state, `initial_client_state`) gets a client-state store in the run folder.

  Attributes:
    unweighted: whether clients count once (the aggregator presets follow it).
    model: the model it trains: 'classifier' (any of `MODELS` but 'mf') or 'mf'.
    evaluation_model: `(config, model) -> FunctionalModel` that evaluates its weights (k-means:
      the centroids' distances); None: the model it trains.
  """

  unweighted: bool = False
  model: str = 'classifier'
  evaluation_model: Callable[[Config, models.FunctionalModel], models.FunctionalModel] | None = None


def _algorithm_entry(path: str, build: Callable) -> Algorithm:
  """The algorithm of an import path: `build(config, BuildInputs)` checked to return a
  `LearningProcess`."""

  def checked(config, inputs):
    process = build(config, inputs)
    if not isinstance(process, LearningProcess):
      raise ValueError(
        f'{path}(settings, inputs) must return a fl.templates.LearningProcess; got '
        f'{type(process).__name__}'
      )
    return process

  return Algorithm(
    name=path,
    description='your own algorithm',
    build=checked,
    reads=tuple(o.name for o in _ALGORITHM_SHARED),
  )


def _fed_kmeans(config, inputs):
  return algorithms.build_fed_kmeans(
    config['clusters'],
    _point_shape(inputs.model),
    random_seed=config['seed'],
    client_chunk_size=inputs.client_chunk_size,
    mesh=inputs.mesh,
  )


def _point_shape(model: models.FunctionalModel) -> tuple[int, ...]:
  spec = model.input_spec['x'] if isinstance(model.input_spec, Mapping) else model.input_spec[0]
  return tuple(spec.shape[1:])


def _kmeans_evaluation_model(config, model):
  """The centroids as a model: its loss is the mean squared distance to the nearest one."""
  return algorithms.kmeans_model(jnp.zeros((config['clusters'], *_point_shape(model))))


def _check_kmeans(config):
  if config['task'] is not None:
    raise ValueError(f"clusters a dataset's inputs; got {flag('task')} {config['task']}")
  if config['aggregator'] != 'mean':
    raise ValueError(
      f'sums points per cluster with its own aggregation; got {flag("aggregator")} '
      f'{config["aggregator"]}'
    )


def _client_server(build):
  """An algorithm built from a client and a server optimizer (FedAvg, MimeLite, Mime)."""

  def client_server(config, inputs):
    return build(
      inputs.model,
      optimizer(config, 'client'),
      optimizer(config, 'server'),
      model_aggregator=inputs.aggregator,
      mesh=inputs.mesh,
      client_chunk_size=inputs.client_chunk_size,
      seed=config['seed'],
    )

  return client_server


def _fed_sgd(config, inputs):
  return algorithms.build_fed_sgd(
    inputs.model,
    server_optimizer=optimizer(config, 'server'),
    model_aggregator=inputs.aggregator,
    mesh=inputs.mesh,
    client_chunk_size=inputs.client_chunk_size,
    seed=config['seed'],
  )


def _fed_prox(config, inputs):
  return algorithms.build_weighted_fed_prox(
    inputs.model,
    config['proximal_strength'],
    optimizer(config, 'client'),
    optimizer(config, 'server'),
    model_aggregator=inputs.aggregator,
    mesh=inputs.mesh,
    client_chunk_size=inputs.client_chunk_size,
    seed=config['seed'],
  )


def _adaptive(build):
  def adaptive(config, inputs):
    return build(
      inputs.model,
      optimizer(config, 'client'),
      config['server_lr'],
      model_aggregator=inputs.aggregator,
      mesh=inputs.mesh,
      client_chunk_size=inputs.client_chunk_size,
      seed=config['seed'],
    )

  return adaptive


def _scaffold(config, inputs):
  return algorithms.build_scaffold(
    inputs.model,
    config['client_lr'],
    config['server_lr'],
    population_size=inputs.population_size,
    model_aggregator=inputs.aggregator,
    mesh=inputs.mesh,
    client_chunk_size=inputs.client_chunk_size,
    seed=config['seed'],
  )


_ALGORITHM_SHARED = (
  Option('client_optimizer', choice(tuple(OPTIMIZERS)), 'sgd', ' | '.join(OPTIMIZERS)),
  Option('client_lr', positive, 0.1, 'client learning rate', ('client_work', 'learning_rate')),
  Option('server_optimizer', choice(tuple(OPTIMIZERS)), 'sgd', ' | '.join(OPTIMIZERS)),
  Option('server_lr', positive, 1.0, 'server learning rate', ('finalizer', 'learning_rate')),
)
_CLIENT = ('client_optimizer', 'client_lr')
_SERVER = ('server_optimizer', 'server_lr')
# Reddi et al. (2021) tune the adaptive server learning rate around 1e-2 (1.0 is FedAvg's).
_ADAPTIVE_DEFAULTS = types.MappingProxyType({'server_lr': 0.01})


def _adaptive_entry(name: str, server: str, build: Callable) -> Algorithm:
  return Algorithm(
    name=name,
    description=f'{name[:3].capitalize()}{name[3:].capitalize()}: FedAvg, {server} on the server',
    build=_adaptive(build),
    reads=(*_CLIENT, 'server_lr'),
    defaults=_ADAPTIVE_DEFAULTS,
  )


ALGORITHMS = Registry(
  'algorithm',
  [
    Algorithm(
      name='fedavg',
      description='FedAvg, clients weighted by examples',
      build=_client_server(algorithms.build_weighted_fed_avg),
      reads=_CLIENT + _SERVER,
    ),
    Algorithm(
      name='fedavg_unweighted',
      description='FedAvg, every client counts once',
      build=_client_server(algorithms.build_unweighted_fed_avg),
      reads=_CLIENT + _SERVER,
      unweighted=True,
    ),
    Algorithm(
      name='fedsgd',
      description='FedSGD: one full-batch gradient per client',
      build=_fed_sgd,
      reads=_SERVER,
    ),
    Algorithm(
      name='fedprox',
      description='FedProx: FedAvg with a proximal term (--proximal-strength)',
      build=_fed_prox,
      reads=_CLIENT + _SERVER,
      settings=(
        Option(
          'proximal_strength',
          non_negative,
          0.01,
          'FedProx mu (fedprox)',
          ('client_work', 'proximal_strength'),
        ),
      ),
    ),
    _adaptive_entry('fedadam', 'Adam', algorithms.build_fed_adam),
    _adaptive_entry('fedyogi', 'Yogi', algorithms.build_fed_yogi),
    _adaptive_entry('fedadagrad', 'Adagrad', algorithms.build_fed_adagrad),
    Algorithm(
      name='mime_lite',
      description='MimeLite: client steps with the server optimizer state',
      build=_client_server(algorithms.build_weighted_mime_lite),
      reads=_CLIENT + _SERVER,
    ),
    Algorithm(
      name='mime',
      description='Mime: MimeLite with control variates',
      build=_client_server(algorithms.build_mime),
      reads=_CLIENT + _SERVER,
    ),
    Algorithm(
      name='scaffold',
      description='SCAFFOLD: client SGD with per-client control variates (stateful clients)',
      build=_scaffold,
      reads=('client_lr', 'server_lr'),
    ),
    Algorithm(
      name='fedrecon',
      description='Federated Reconstruction (matrix factorization, local user embeddings)',
      build=None,  # built with its data: fedjax_lite._experiment
      reads=_CLIENT + _SERVER,
      settings=(Option('recon_lr', positive, 0.1, 'reconstruction learning rate (fedrecon)'),),
      model='mf',
    ),
    Algorithm(
      name='fed_kmeans',
      description='federated mini-batch k-means of the inputs (labels unused)',
      build=_fed_kmeans,
      settings=(Option('clusters', int_in(1), 10, 'k, the clusters (fed_kmeans)'),),
      defaults={'epochs': 1},  # TFF's: each point once a round
      check=_check_kmeans,
      evaluation_model=_kmeans_evaluation_model,
    ),
  ],
  shared=_ALGORITHM_SHARED,
  from_import=_algorithm_entry,
  import_hint='(settings, inputs) -> fl.templates.LearningProcess',
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Aggregator(Entry):
  """A model-update aggregator: `build(config, unweighted) -> aggregation factory` (`unweighted`:
  the algorithm counts every client once).

  Attributes:
    accountant: `(config, population) -> privacy accountant or None`, for a private one.
    pins: settings a resumed run may not change though others' runs may (DP-FTRL's mechanism
      is built and analysed for the run's `rounds`).
  """

  accountant: Callable[[Config, int], Any] | None = None
  pins: tuple[str, ...] = ()


def _mean(unweighted: bool):
  return aggregators.UnweightedMeanFactory() if unweighted else aggregators.MeanFactory()


def _clip(config, unweighted):
  if config['clip'] is None:
    return aggregators.default_clipping(_mean(unweighted))
  return aggregators.clipping_factory(config['clip'], _mean(unweighted))


def _dp(config, unweighted):
  """DP-FedAvg's Gaussian mechanism; the run's seed keys the noise (each seed of a sweep
  draws its own)."""
  del unweighted  # the DP factories average clipped updates, each client once (as TFF's)
  noise, cohort, seed = config['noise_multiplier'], config['clients_per_round'], config['seed']
  if config['clip'] is None:
    return aggregators.dp_aggregator(noise, cohort, seed=seed)
  return aggregators.DifferentiallyPrivateFactory.gaussian_fixed(
    noise, cohort, config['clip'], seed
  )


def _check_budget_has_noise(config):
  if config['epsilon_budget'] and not config['noise_multiplier']:
    raise ValueError(f'{flag("epsilon_budget")} needs a {flag("noise_multiplier")} > 0')


def _check_dp(config):
  noise, cohort = config['noise_multiplier'], config['clients_per_round']
  if noise is None:
    raise ValueError(
      f'needs {flag("noise_multiplier")} (the noise standard deviation over the clip; 0 for '
      'clipping without noise)'
    )
  _check_budget_has_noise(config)
  # The adaptive clip's count takes noise 0.05 · cohort of the total, which must exceed noise / 2.
  if config['clip'] is None and noise and not 2 * (0.05 * cohort) > noise:
    raise ValueError(
      f'with the adaptive clip (no {flag("clip")}) needs more than {10 * noise:g} clients a '
      f'round for {flag("noise_multiplier")} {noise:g} (10 per unit of noise: counting the '
      f'clipped clients takes a share of the noise); got {flag("clients_per_round")} {cohort}. '
      f'Tip: pass a fixed clip ({flag("clip")} 1.0, sized to the update norms), or raise '
      f'{flag("clients_per_round")}.'
    )


def default_target_delta(population: int) -> float:
  """δ without `--target-delta`: 0.1 / population, well below TF Privacy's bound δ < 1 /
  population (a δ near 1 / N allows a mechanism that reveals a whole client's data with that
  probability: about one of N clients; 0.1 / N, one in ten runs)."""
  return 0.1 / population


def target_delta(config: Config, population: int) -> float:
  """`--target-delta`, or the default; refuses a δ of at least 1 / population."""
  delta = config['target_delta']
  if delta is None:
    return default_target_delta(population)
  if delta >= 1 / population:
    raise ValueError(
      f'{flag("target_delta")} {delta:g} is not below 1/{population} = {1 / population:.3g} '
      f'(1 over the {population} training clients): such a delta allows revealing a whole '
      f"client's data. Tip: pass {flag('target_delta')} {default_target_delta(population):.3g} "
      '(0.1 / clients, the default) or less.'
    )
  return delta


def check_budget(config: Config, accountant: Any) -> None:
  """Refuses an ε budget below one round's ε."""
  budget = config['epsilon_budget']
  if budget and accountant.epsilon(1) > budget:
    raise ValueError(
      f'{flag("epsilon_budget")} {budget:g} is below the epsilon of one round '
      f'({accountant.epsilon(1):.4g} at delta={accountant.target_delta:.3g}), so no round '
      f'could run. Tip: raise {flag("epsilon_budget")} or {flag("noise_multiplier")}, or lower '
      f'{flag("clients_per_round")}.'
    )


def _dp_accountant(config, population):
  if not config['noise_multiplier']:
    return None
  accountant = aggregators.PrivacyAccountant(
    config['noise_multiplier'],
    config['clients_per_round'],
    population,
    target_delta(config, population),
    sampling='fixed_size',  # fl.data.sample_cohort draws a fixed-size cohort without replacement
  )
  check_budget(config, accountant)
  return accountant


def _check_krum(config):
  """Krum's guarantee for f Byzantine clients needs more than 2f + 2 a round (Blanchard et al.,
  2017)."""
  byzantine, cohort = config['byzantine'], config['clients_per_round']
  if cohort <= 2 * byzantine + 2:
    lower = f' or lower {flag("byzantine")} to {(cohort - 3) // 2}' if cohort >= 3 else ''
    raise ValueError(
      f'with {flag("byzantine")} {byzantine} needs more than {2 * byzantine + 2} clients a '
      f'round (2 x byzantine + 2); got {flag("clients_per_round")} {cohort}. Tip: raise '
      f'{flag("clients_per_round")} to {2 * byzantine + 3}{lower}.'
    )


def _dp_ftrl(config, unweighted):
  """DP-FTRL: correlated noise of `--mechanism` for the run's `--rounds`, cohorts at least
  `--min-separation` rounds apart; the run's seed keys the noise."""
  del unweighted  # as DP-FedAvg's: each client once
  return aggregators.dp_ftrl_aggregator(
    config['noise_multiplier'],
    config['clients_per_round'],
    config['clip'],
    mechanism=config['mechanism'],
    total_rounds=config['rounds'],
    min_separation=config['min_separation'],
    seed=config['seed'],
  )


def _check_dp_ftrl(config):
  if config['clip'] is None or config['noise_multiplier'] is None:
    raise ValueError(
      f"needs {flag('clip')} (a fixed L2 clip: the mechanism's sensitivity is in its units) "
      f'and {flag("noise_multiplier")} (the noise standard deviation over the clip)'
    )
  _check_budget_has_noise(config)
  if config['min_separation'] > config['rounds']:
    raise ValueError(
      f'with {flag("min_separation")} {config["min_separation"]} needs at least as many '
      f'{flag("rounds")}; got {config["rounds"]}'
    )


def _dp_ftrl_accountant(config, population):
  if not config['noise_multiplier']:
    return None
  accountant = aggregators.DPFTRLAccountant(
    config['mechanism'],
    config['noise_multiplier'],
    target_delta(config, population),
    total_rounds=config['rounds'],
    min_separation=config['min_separation'],
  )
  check_budget(config, accountant)
  return accountant


_CLIP = Option('clip', optional(positive), None, 'L2 clip (clip, dp, dp_ftrl); none: adaptive')
_AGGREGATOR_SHARED = (
  _CLIP,
  Option('noise_multiplier', optional(non_negative), None, 'DP noise / clip (dp)'),
  Option(
    'target_delta', optional(number_in(0, 1)), None, 'DP delta, below 1/clients; none: 0.1/clients'
  ),
  Option('epsilon_budget', optional(positive), None, 'stop before epsilon exceeds it'),
)
_DP = tuple(o.name for o in _AGGREGATOR_SHARED)

AGGREGATORS = Registry(
  'aggregator',
  [
    Aggregator(
      name='mean',
      description="the algorithm's mean (weighted by examples, or unweighted)",
      build=lambda config, unweighted: _mean(unweighted),
    ),
    Aggregator(
      name='robust',
      description="TFF's robust preset: zeroing of outliers, then adaptive clipping",
      build=lambda config, unweighted: aggregators.robust_aggregator(weighted=not unweighted),
    ),
    Aggregator(
      name='clip',
      description='L2 clipping of each update (adaptive without --clip)',
      build=_clip,
      reads=('clip',),
    ),
    Aggregator(
      name='zero',
      description="TFF's adaptive zeroing of outlier updates",
      build=lambda config, unweighted: aggregators.default_zeroing(_mean(unweighted)),
    ),
    Aggregator(
      name='compression',
      description='uniform quantization of each update to --bits bits',
      build=lambda config, unweighted: aggregators.compression_aggregator(
        weighted=not unweighted, bits=config['bits']
      ),
      settings=(Option('bits', int_in(1), 8, 'bits per coordinate, 1..16 (compression)'),),
    ),
    Aggregator(
      name='secure',
      description="TFF's secure-aggregation preset (bounded integer sums)",
      build=lambda config, unweighted: aggregators.secure_aggregator(weighted=not unweighted),
    ),
    Aggregator(
      name='dp',
      description='DP-FedAvg: clipping and Gaussian noise, amplification by sampling',
      build=_dp,
      reads=_DP,
      check=_check_dp,
      accountant=_dp_accountant,
    ),
    Aggregator(
      name='dp_ftrl',
      description='DP-FTRL: clipping and correlated noise (tree, banded MF, BLT), no sampling',
      build=_dp_ftrl,
      reads=_DP,
      settings=(
        Option('mechanism', choice(('tree', 'banded', 'blt')), 'blt', 'tree | banded | blt'),
        Option(
          'min_separation',
          int_in(1),
          1,
          'rounds between two of a client (dp_ftrl): cohorts from 1 of B groups in turn',
        ),
      ),
      check=_check_dp_ftrl,
      accountant=_dp_ftrl_accountant,
      pins=('rounds',),
    ),
    Aggregator(
      name='median',
      description='coordinate-wise median',
      build=lambda config, unweighted: aggregators.median_factory(),
    ),
    Aggregator(
      name='trimmed_mean',
      description='coordinate-wise mean without the extremes',
      build=lambda config, unweighted: aggregators.trimmed_mean_factory(config['trim_fraction']),
      settings=(
        Option(
          'trim_fraction',
          number_in(0, 0.5, low_inclusive=True),
          0.1,
          'trimmed per side (trimmed_mean)',
        ),
      ),
    ),
    Aggregator(
      name='krum',
      description='Krum: the update closest to its neighbours (Blanchard et al. 2017)',
      build=lambda config, unweighted: aggregators.krum_factory(
        config['byzantine'], clients_per_round=config['clients_per_round']
      ),
      settings=(Option('byzantine', int_in(0), 1, 'Byzantine clients tolerated (krum)'),),
      check=_check_krum,
    ),
  ],
  shared=_AGGREGATOR_SHARED,
)


def _task_entry(path: str, build: Callable) -> Entry:
  """The task of an import path: `build()` checked to return a `fl.tasks.Task`."""

  def checked():
    task = build()
    if not isinstance(task, tasks.Task):
      raise ValueError(f'{path}() must return a fl.tasks.Task; got {type(task).__name__}')
    return task

  return Entry(name=path, description='your own task', build=checked)


# `build() -> fl.tasks.Task`: a dataset, its model, TFF's metrics and a paper's defaults.
TASKS = Registry(
  'task',
  [
    Entry(name=t.name, description=t.description, build=lambda t=t: t) for t in tasks.TASKS.values()
  ],
  from_import=_task_entry,
  import_hint='() -> fl.tasks.Task',
)
# The registries whose entries read settings, by the setting that selects the entry.
REGISTRIES: tuple[Registry, ...] = (ALGORITHMS, AGGREGATORS, PARTITIONS, MODELS)


def with_defaults(config: Config, given: set[str]) -> dict[str, Any]:
  """`config` with the chosen entries' own defaults for the settings not `given` (a new run):
  a task's (its paper's hyperparameters; with `--server-optimizer` given, the paper's rates for
  that optimizer), then its algorithm's. Raises ValueError naming `--task` for a task that
  cannot be built or has no rates for the given server optimizer."""
  defaults: dict[str, Any] = {}
  if config['task'] is not None:
    try:
      task = TASKS.entry(config['task']).build()
      optimizer = config['server_optimizer'] if 'server_optimizer' in given else None
      task_defaults = task.settings(optimizer)
    except ValueError as error:
      raise ValueError(f'{flag("task")}: {error}') from None
    reads = set(ALGORITHMS.reads(config['algorithm']))
    shared = {o.name for o in ALGORITHMS.shared}
    defaults.update({k: v for k, v in task_defaults.items() if k not in shared or k in reads})
  for registry in REGISTRIES:
    name = config[registry.kind]
    if name in registry:
      defaults.update(registry[name].defaults)
  return {**config, **{k: v for k, v in defaults.items() if k not in given}}


def check_settings(config: Config, given: set[str]) -> None:
  """Raises ValueError for a setting in `given` that the chosen entry of its registry does not
  read, or for settings an entry's own check refuses (the message names the flags)."""
  splitting = {'partition', 'num_clients', *(o.name for o in PARTITIONS.options())}
  if config['task'] is not None:
    fixed = [n for n in ('dataset', 'model', *sorted(splitting)) if n in given]
    if config['stand_in']:
      fixed = [n for n in fixed if n != 'num_clients']  # the stand-in's clients
    if fixed:
      raise ValueError(
        f'{", ".join(flag(n) for n in fixed)}: {flag("task")} {config["task"]} brings its own '
        'data and model'
      )
  elif data.get_dataset(config['dataset']).kind != 'arrays':
    split = [n for n in sorted(splitting) if n in given]
    if split:
      raise ValueError(
        f'{", ".join(flag(n) for n in split)}: {flag("dataset")} {config["dataset"]} is '
        'federated already (its own clients); they split a centralized dataset'
      )
  if config['task'] is None and config['stand_in']:
    raise ValueError(f'{flag("stand_in")} goes with {flag("task")} (its generated stand-in data)')
  if config['stand_in'] and 'data_path' in given:
    raise ValueError(f'{flag("data_path")}: {flag("stand_in")} generates its data, reads none')
  for registry in REGISTRIES:
    name = config[registry.kind]
    unused = registry.unread(config, given)
    if unused:
      names = ', '.join(flag(n) for n in unused)
      verb = 'does' if len(unused) == 1 else 'do'
      reads = ', '.join(flag(n) for n in registry.reads(name)) or 'no setting'
      users = [e.name for e in registry.values() if unused[0] in e.reads_all()]
      raise ValueError(
        f'{names} {verb} not apply to {flag(registry.kind)} {name} (it reads {reads}); '
        f'{flag(unused[0])} goes with {flag(registry.kind)} {" or ".join(users)}'
      )
    check = registry[name].check if name in registry else None
    if check is not None:
      try:
        check(config)
      except ValueError as error:
        raise ValueError(f'{flag(registry.kind)} {name} {error}') from None
