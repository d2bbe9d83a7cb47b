"""Adaptive federated optimization (Reddi et al., 2021, "Adaptive Federated Optimization"):
FedAdam, FedYogi and FedAdagrad, FedAvg with an adaptive server optimizer.

Each is `build_weighted_fed_avg` with `server_optimizer=fl.optimizers.build_adam/yogi/adagrad`
(TFF's update rules): the server treats the averaged client delta as a gradient. TFF has no
builder of its own for them; its users pass `server_optimizer_fn=tff.learning.optimizers.
build_adam(...)` to `build_weighted_fed_avg`, which these presets do. Defaults are the paper's
(β₁ = 0.9, β₂ = 0.99, τ = eps = 1e-3 for FedAdam and FedYogi).
"""

from __future__ import annotations

from typing import Any

import optax

from fedjax_lite import models, optimizers
from fedjax_lite.algorithms import _fed_avg
from fedjax_lite.templates import _processes


def build_fed_adam(
  model: models.FunctionalModel,
  client_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 0.01,
  *,
  b1: float = 0.9,
  b2: float = 0.99,
  eps: float = 1e-3,
  **fed_avg_kwargs: Any,
) -> _processes.LearningProcess:
  """FedAdam (Reddi et al., 2021): FedAvg with TFF's Adam on the server.

  Example:
    >>> process = fl.algorithms.build_fed_adam(
    ...     model, fl.optimizers.build_sgdm(0.1), server_learning_rate=0.01)

  Args:
    model: a `FunctionalModel`.
    client_optimizer: optax transformation for local training.
    server_learning_rate, b1, b2, eps: `fl.optimizers.build_adam`'s, on the averaged delta;
      in state as `hparams['finalizer']`.
    **fed_avg_kwargs: any keyword of `build_weighted_fed_avg` (`client_weighting`,
      `model_aggregator`, `client_chunk_size`, `mesh`, `seed`, ...).
  """
  server = optimizers.build_adam(server_learning_rate, b1, b2, eps)
  return _fed_avg.build_weighted_fed_avg(model, client_optimizer, server, **fed_avg_kwargs)


def build_fed_yogi(
  model: models.FunctionalModel,
  client_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 0.01,
  *,
  b1: float = 0.9,
  b2: float = 0.99,
  eps: float = 1e-3,
  initial_accumulator_value: float = 1e-6,
  **fed_avg_kwargs: Any,
) -> _processes.LearningProcess:
  """FedYogi (Reddi et al., 2021): FedAvg with TFF's Yogi on the server (`build_yogi`'s
  arguments, `server_learning_rate` its learning rate); other arguments as `build_fed_adam`."""
  server = optimizers.build_yogi(server_learning_rate, b1, b2, eps, initial_accumulator_value)
  return _fed_avg.build_weighted_fed_avg(model, client_optimizer, server, **fed_avg_kwargs)


def build_fed_adagrad(
  model: models.FunctionalModel,
  client_optimizer: optax.GradientTransformation,
  server_learning_rate: float = 0.01,
  *,
  initial_accumulator_value: float = 1e-6,
  eps: float = 1e-7,
  **fed_avg_kwargs: Any,
) -> _processes.LearningProcess:
  """FedAdagrad (Reddi et al., 2021): FedAvg with TFF's Adagrad on the server,
  `s ← s + Δ²`, `w ← w − lr·Δ/√(s + eps)`. The accumulator starts at the paper's τ² = 1e-6
  (`build_adagrad`'s default is 0.1); other arguments as `build_fed_adam`."""
  server = optimizers.build_adagrad(server_learning_rate, initial_accumulator_value, eps)
  return _fed_avg.build_weighted_fed_avg(model, client_optimizer, server, **fed_avg_kwargs)
