"""`load_run`: a run folder written by `fedjax-lite train` (or `sweep`) back in Python: its
settings, its state at a checkpointed round, the model weights, its metrics, and the process and
evaluation that produced them."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import numpy as np

from fedjax_lite.simulation import _checkpoint, _metrics_managers

CONFIG_FILE = 'config.json'
CHECKPOINT_DIR = 'checkpoints'
METRICS_FILE = 'metrics.jsonl'


class Run(NamedTuple):
  """A run folder, loaded.

  Attributes:
    run_dir: the folder.
    config: its settings (`config.json`, every option of `fedjax-lite train`).
    round_num: the round `state` is the result of.
    state: the process state of that round.
    model_weights: `process.get_model_weights(state)`, a `ModelWeights`.
    metrics: `round_num -> flat metrics` the run released (`metrics.jsonl`), rounds ascending.
    process: the `LearningProcess` the settings build (e.g. to train on: `process.next(state,
      ...)`).
    evaluation_fn: `(state, ClientBatches) -> metrics`, as the run evaluated.
    evaluation_data: the held-out `ClientBatches` the run evaluated on.
    model: the `FunctionalModel` it trained (None for matrix factorization and k-means).
    held_out_clients: `() -> FederatedData`, the held-out data as clients `{'x', 'y'}` (a
      federated dataset's test clients; a centralized one's test examples split by the run's
      partition); None where `model` is.
  """

  run_dir: str
  config: Mapping[str, Any]
  round_num: int
  state: Any
  model_weights: Any
  metrics: Mapping[int, Mapping[str, Any]]
  process: Any
  evaluation_fn: Callable[[Any, Any], Mapping[str, Any]]
  evaluation_data: Any
  model: Any = None
  held_out_clients: Callable[[], Any] | None = None

  def evaluate(self, client_batches: Any = None) -> dict[str, Any]:
    """The run's model at `round_num` evaluated on `client_batches` (e.g. your own data,
    `fl.data.build_client_batches([{'x': ..., 'y': ...}], batch_size=256, shuffle=False)`;
    default the run's held-out data); flat metrics (`loss`, `num_examples`, the model's)."""
    data = self.evaluation_data if client_batches is None else client_batches
    metrics = self.evaluation_fn(self.state, data)
    return _metrics_managers.flatten_metrics(jax.device_get(metrics))

  def evaluate_personalized(
    self,
    personalize_fns: Mapping[str, Any],
    *,
    max_clients: int = 100,
    fine_tune_fraction: float = 0.5,
    batch_size: int | None = None,
  ):
    """Personalization evaluation of the run's model on its held-out clients
    (`fl.algorithms.build_personalization_eval`): each client's examples are shuffled (seed 0)
    and split, the first `fine_tune_fraction` fine-tunes each strategy of `personalize_fns`,
    the rest evaluates it and the global model (`'baseline_metrics'`).

    Example:
      >>> out = run.evaluate_personalized({'sgd_2_epochs': fl.algorithms.Personalization(
      ...     fl.optimizers.build_sgdm(0.1), num_epochs=2)})
      >>> out.metrics['sgd_2_epochs']['accuracy'], out.metrics['baseline_metrics']['accuracy']

    Args:
      personalize_fns: strategy name -> `fl.algorithms.Personalization` (or optax optimizer).
      max_clients: held-out clients evaluated (the first ones), an int >= 1.
      fine_tune_fraction: the share of each client's examples that fine-tunes, in (0, 1).
      batch_size: default the run's `batch_size`.

    Returns:
      A `PersonalizationEvalOutput` (metrics over all clients and per client).
    """
    from fedjax_lite import algorithms, data  # the simulation package does not import them

    if self.model is None:
      raise ValueError(
        f'{self.run_dir} trained no classifier ({self.config["algorithm"]}); personalization '
        'evaluation fine-tunes one'
      )
    if not 0 < fine_tune_fraction < 1:
      raise ValueError(f'fine_tune_fraction must be in (0, 1); got {fine_tune_fraction!r}')
    if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
      raise ValueError(f'max_clients must be an int >= 1; got {max_clients!r}')
    population = self.held_out_clients()
    rng = np.random.default_rng(0)
    tune, test = [], []
    for _, client in list(population)[:max_clients]:
      order = rng.permutation(len(client['y']))
      cut = round(fine_tune_fraction * len(order))
      tune.append({k: v[order[:cut]] for k, v in client.items()})
      test.append({k: v[order[cut:]] for k, v in client.items()})
    size = batch_size or self.config['batch_size']
    tune_batches = data.build_client_batches(tune, batch_size=size, shuffle=False)
    test_batches = data.build_client_batches(test, batch_size=size, shuffle=False)
    evaluate = algorithms.build_personalization_eval(
      self.model, personalize_fns, max_num_clients=max_clients, seed=self.config['seed']
    )
    return evaluate(self.model_weights, tune_batches, test_batches)


def read_settings(path: str) -> dict[str, Any]:
  """A run folder's saved settings (`config.json`); a damaged file is a ValueError naming it."""
  try:
    with open(path) as f:
      saved = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as error:
    raise ValueError(f"{path} is damaged ({error}); it holds the run's settings") from None
  if not isinstance(saved, dict):
    raise ValueError(f'{path} is damaged: expected a table of settings')
  return saved


def load_run(run_dir: str | os.PathLike, round_num: int | None = None) -> Run:
  """Loads `run_dir` at its latest checkpoint, or at `round_num`.

  The settings rebuild the run's process and data exactly as the command built them (the
  dataset must be available, as for `fedjax-lite eval`), so the state is read with its own
  structure.

  Example:
    >>> run = fl.simulation.load_run('runs/digits-mlp-fedavg')
    >>> run.round_num, run.metrics[run.round_num]['evaluation/accuracy']
    >>> run.evaluate(fl.data.build_client_batches([{'x': x, 'y': y}], batch_size=256))

  Raises:
    FileNotFoundError: `run_dir` has no `config.json` (not a run folder).
    ValueError: a damaged `config.json`, no checkpoint yet, or none of `round_num`.
  """
  from fedjax_lite import _config, _experiment  # the command's settings and builders

  run_dir = os.fspath(run_dir)
  path = os.path.join(run_dir, CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{run_dir} is not a run folder ({path} is missing)')
  config = _config.resolve({}, read_settings(path))
  experiment = _experiment.build_experiment(config)
  checkpoints = _checkpoint.FileCheckpointManager(os.path.join(run_dir, CHECKPOINT_DIR))
  structure = jax.eval_shape(experiment.process.initialize)
  if round_num is None:
    state, round_num = checkpoints.load_latest_checkpoint(structure)
    if state is None:
      raise ValueError(f'{run_dir} has no checkpoint yet')
  else:
    if round_num not in checkpoints.checkpoint_rounds():
      raise ValueError(
        f'no checkpoint of round {round_num} in {run_dir}; it has rounds '
        f'{checkpoints.checkpoint_rounds()}'
      )
    state = checkpoints.load_checkpoint(structure, round_num)
  metrics_path = os.path.join(run_dir, METRICS_FILE)
  metrics = _metrics_managers.load_metrics(metrics_path) if os.path.isfile(metrics_path) else {}
  return Run(
    run_dir,
    dict(config),
    round_num,
    state,
    experiment.process.get_model_weights(state),
    metrics,
    experiment.process,
    experiment.evaluation_fn,
    experiment.evaluation_data,
    experiment.model,
    experiment.held_out_clients,
  )
