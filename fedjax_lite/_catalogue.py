"""What `fedjax-lite train` can build, by name: optimizers, models and algorithms.

Each algorithm entry declares the settings it reads beyond the shared ones (`ALGORITHM_SETTINGS`)
and builds its own learning process and evaluation, so the command has no per-algorithm branch:
adding an algorithm is adding an entry. A setting given for an algorithm that does not read it is
an error, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import sys
import types
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import optax

from fedjax_lite import algorithms, models, optimizers
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


# name -> `(num_features or image shape, num_classes, seed) -> FunctionalModel` (classifiers).
CLASSIFIERS: Mapping[str, Callable[..., models.FunctionalModel]] = types.MappingProxyType(
  {
    'logreg': lambda shape, classes, seed: models.mlp_classifier(shape[0], classes, (), seed),
    'mlp': lambda shape, classes, seed: models.mlp_classifier(shape[0], classes, (200, 200), seed),
    'cnn': lambda shape, classes, seed: models.cnn_classifier(shape, classes, seed),
  }
)
# Models with their own data and algorithm (matrix factorization needs fedrecon and MovieLens).
MODELS = (*CLASSIFIERS, 'mf')


def classifier(name: str) -> Callable[..., models.FunctionalModel]:
  """`CLASSIFIERS[name]`, or for an import path `module:callable` your own: called as the
  catalogue's are, `(input shape, num_classes, seed)` (the input shape of one example: features
  `(n,)`, or `(side, side, 1)` images for the built-in CNN only), it must return a
  `fl.FunctionalModel`. Its module is imported from the working folder or `sys.path`. Raises
  ValueError naming the path when it cannot be used."""
  if name in CLASSIFIERS:
    return CLASSIFIERS[name]
  module_name, _, attribute = name.partition(':')
  if os.getcwd() not in sys.path:  # as `python -m` would: modules beside you import
    sys.path.insert(0, os.getcwd())
  try:
    build = getattr(importlib.import_module(module_name), attribute)
  except ImportError as error:
    raise ValueError(f'{name}: cannot import {module_name} ({error})') from None
  except AttributeError:
    raise ValueError(f'{name}: {module_name} has no {attribute}') from None
  if not callable(build):
    raise ValueError(f'{name} is not callable; got {type(build).__name__}')

  def checked(shape, num_classes, seed):
    model = build(shape, num_classes, seed)
    if not isinstance(model, models.FunctionalModel):
      raise ValueError(
        f'{name}(input_shape, num_classes, seed) must return a fl.FunctionalModel; got '
        f'{type(model).__name__}'
      )
    return model

  return checked


# Settings that only some algorithms read; every other setting applies to all of them.
ALGORITHM_SETTINGS = (
  'client_optimizer',
  'client_lr',
  'server_optimizer',
  'server_lr',
  'proximal_strength',
  'recon_lr',
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


@dataclasses.dataclass(frozen=True)
class Algorithm:
  """An algorithm of the command.

  Attributes:
    name: `--algorithm NAME`.
    description: one line for `--help`.
    reads: the `ALGORITHM_SETTINGS` it uses.
    build: `(config, BuildInputs) -> LearningProcess`; a stateful process (per-client state,
      `initial_client_state`) gets a client-state store in the run folder.
    unweighted: whether clients count once (the aggregator presets follow it).
    model: the model it trains: 'classifier' (any of `CLASSIFIERS`) or 'mf'.
    defaults: its own defaults of shared settings (a new run's, where not given).
  """

  name: str
  description: str
  reads: tuple[str, ...]
  build: Callable[[Config, BuildInputs], LearningProcess] | None
  unweighted: bool = False
  model: str = 'classifier'
  defaults: Mapping[str, Any] = dataclasses.field(default_factory=dict)


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


_CLIENT = ('client_optimizer', 'client_lr')
# Reddi et al. (2021) tune the adaptive server learning rate around 1e-2 (1.0 is FedAvg's).
_ADAPTIVE_DEFAULTS = types.MappingProxyType({'server_lr': 0.01})
_SERVER = ('server_optimizer', 'server_lr')

ALGORITHMS: Mapping[str, Algorithm] = types.MappingProxyType(
  {
    entry.name: entry
    for entry in (
      Algorithm(
        'fedavg',
        'FedAvg, clients weighted by examples',
        _CLIENT + _SERVER,
        _client_server(algorithms.build_weighted_fed_avg),
      ),
      Algorithm(
        'fedavg_unweighted',
        'FedAvg, every client counts once',
        _CLIENT + _SERVER,
        _client_server(algorithms.build_unweighted_fed_avg),
        unweighted=True,
      ),
      Algorithm('fedsgd', 'FedSGD: one full-batch gradient per client', _SERVER, _fed_sgd),
      Algorithm(
        'fedprox',
        'FedProx: FedAvg with a proximal term (--proximal-strength)',
        (*_CLIENT, *_SERVER, 'proximal_strength'),
        _fed_prox,
      ),
      Algorithm(
        'fedadam',
        'FedAdam: FedAvg, Adam on the server',
        (*_CLIENT, 'server_lr'),
        _adaptive(algorithms.build_fed_adam),
        defaults=_ADAPTIVE_DEFAULTS,
      ),
      Algorithm(
        'fedyogi',
        'FedYogi: FedAvg, Yogi on the server',
        (*_CLIENT, 'server_lr'),
        _adaptive(algorithms.build_fed_yogi),
        defaults=_ADAPTIVE_DEFAULTS,
      ),
      Algorithm(
        'fedadagrad',
        'FedAdagrad: FedAvg, Adagrad on the server',
        (*_CLIENT, 'server_lr'),
        _adaptive(algorithms.build_fed_adagrad),
        defaults=_ADAPTIVE_DEFAULTS,
      ),
      Algorithm(
        'mime_lite',
        'MimeLite: client steps with the server optimizer state',
        _CLIENT + _SERVER,
        _client_server(algorithms.build_weighted_mime_lite),
      ),
      Algorithm(
        'mime',
        'Mime: MimeLite with control variates',
        _CLIENT + _SERVER,
        _client_server(algorithms.build_mime),
      ),
      Algorithm(
        'scaffold',
        'SCAFFOLD: client SGD with per-client control variates (stateful clients)',
        ('client_lr', 'server_lr'),
        _scaffold,
      ),
      Algorithm(
        'fedrecon',
        'Federated Reconstruction (matrix factorization, local user embeddings)',
        (*_CLIENT, *_SERVER, 'recon_lr'),
        None,  # built with its data: fedjax_lite._experiment
        model='mf',
      ),
    )
  }
)


def with_defaults(config: Config, given: set[str]) -> dict[str, Any]:
  """`config` with its algorithm's own defaults for the settings not `given` (a new run)."""
  defaults = ALGORITHMS[config['algorithm']].defaults
  return {**config, **{k: v for k, v in defaults.items() if k not in given}}


def check_settings(config: Config, given: set[str], flag: Callable[[str], str]) -> None:
  """Raises ValueError for a setting in `given` that `config['algorithm']` does not read."""
  entry = ALGORITHMS[config['algorithm']]
  unused = [name for name in ALGORITHM_SETTINGS if name in given and name not in entry.reads]
  if unused:
    names = ', '.join(flag(name) for name in unused)
    verb = 'does' if len(unused) == 1 else 'do'
    reads = ', '.join(flag(name) for name in entry.reads) or 'none of them'
    raise ValueError(
      f'{names} {verb} not apply to {flag("algorithm")} {entry.name} (it reads {reads})'
    )
