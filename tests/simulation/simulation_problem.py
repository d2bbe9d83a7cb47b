"""A tiny federated problem (linear softmax, FedAvg, 6 clients, 3 a round) shared by the
simulation tests and the subprocess they kill."""

from __future__ import annotations

import os

import numpy_reference as ref

import fedjax_lite as fl

SIZES = [7, 12, 5, 9, 3, 10]
COHORT = 3
BATCH = 4
STEPS = 3  # ceil(max(SIZES) / BATCH): one shape, one compile


def make_problem(seed: int = 0):
  """(process, training_selection_fn, evaluation_fn, evaluation_selection_fn)."""
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES, seed=seed)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0)
  )

  def training_selection_fn(round_num):
    cohort = fl.data.sample_cohort(len(clients), COHORT, round_num, seed)
    return fl.data.build_client_batches(
      [clients[i] for i in cohort], batch_size=BATCH, num_steps=STEPS, seed=(seed, round_num)
    )

  eval_batches = fl.data.build_client_batches(
    ref.random_clients([11, 6], seed=seed + 100), batch_size=BATCH, shuffle=False
  )
  evaluation_fn = fl.simulation.build_evaluation_fn(process, fl.algorithms.build_fed_eval(model))
  return process, training_selection_fn, evaluation_fn, lambda round_num: eval_batches


def run_experiment(
  problem, run_dir, total_rounds, *, selection_fn=None, extra_managers=(), rounds_per_checkpoint=1
):
  """The run the resume tests repeat: evaluation every 2 rounds, CSV + JSONL, keep=3."""
  process, training_selection_fn, evaluation_fn, evaluation_selection_fn = problem
  managers = [
    fl.simulation.CSVMetricsManager(os.path.join(run_dir, 'metrics.csv')),
    fl.simulation.JSONLMetricsManager(os.path.join(run_dir, 'metrics.jsonl')),
    *extra_managers,
  ]
  return fl.simulation.run_training_process(
    process,
    selection_fn or training_selection_fn,
    total_rounds,
    evaluation_fn=evaluation_fn,
    evaluation_selection_fn=evaluation_selection_fn,
    rounds_per_evaluation=2,
    checkpoint_manager=fl.simulation.FileCheckpointManager(
      os.path.join(run_dir, 'checkpoints'), keep=3
    ),
    rounds_per_checkpoint=rounds_per_checkpoint,
    metrics_managers=managers,
  )
