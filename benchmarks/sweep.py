"""K runs of one FedAvg process as one program (`fl.templates.build_sweep`) against the same K
runs one after another: client-examples per second, the speedup and XLA's temporaries per run.

The workload is `fedjax-lite train`'s default: the digits (1,437 training images of 8x8) split
over 30 clients (Dirichlet, alpha 0.5), 10 clients a round, batch 16, 2 local epochs, the MLP
64-200-200-10, client SGD, server SGD 1.0. The K runs differ in client learning rate (cycling
over 0.03, 0.1, 0.3) and seed (initial weights, keys); every round all K see the same cohort
(common random numbers), padded to one shape, built before the clock starts and already on the
device.

For each K: one warm-up round (compilation), then `--rounds` timed rounds, interleaved: the
sweep's round (one call of the vectorized `next`), then the K runs' rounds one after another
(K calls of one compiled `process.next`, each run's state holding its own hyperparameters).
Client-examples per second are K times the round's real examples over the round's seconds.
Memory is XLA's temporary bytes of the compiled program over the runs it advances.

Usage:
  python benchmarks/sweep.py [--runs 1 4 16] [--rounds 5] [--out benchmarks/results/sweep.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Callable, Sequence

import harness
import jax
import numpy as np

import fedjax_lite as fl

NUM_CLIENTS = 30
COHORT = 10
BATCH_SIZE = 16
EPOCHS = 2
HIDDEN = (200, 200)
LEARNING_RATES = (0.03, 0.1, 0.3)


def load_population() -> list[dict[str, np.ndarray]]:
  """The training clients of `fedjax-lite train`'s default digits split (seed 0)."""
  x, y = fl.data.load_digits()
  (x_train, y_train), _ = fl.data.train_test_split(x, y)
  parts = fl.data.dirichlet_label_partition(y_train, NUM_CLIENTS, 0.5, seed=0)
  return [{'x': x_train[p], 'y': y_train[p]} for p in parts]


def process_fn(seed: int) -> fl.LearningProcess:
  model = fl.models.mlp_classifier(64, 10, hidden=HIDDEN, seed=seed)
  return fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), seed=seed
  )


def sweep_runs(k: int) -> list[fl.templates.SweepRun]:
  return [
    fl.templates.SweepRun(i, {'client_work': {'learning_rate': LEARNING_RATES[i % 3]}})
    for i in range(k)
  ]


def digits_cohorts(clients: list[dict], rounds: int) -> list[fl.ClientBatches]:
  """`rounds + 1` cohorts of the digits workload (round 0's is the warm-up), padded to one shape
  and on the device."""
  steps = fl.data.client_steps(max(len(c['y']) for c in clients), EPOCHS, BATCH_SIZE)
  cohorts = []
  for r in range(rounds + 1):
    ids = fl.data.sample_cohort(NUM_CLIENTS, COHORT, r, seed=0)
    batches = fl.data.build_client_batches(
      [clients[i] for i in ids], batch_size=BATCH_SIZE, num_epochs=EPOCHS, num_steps=steps
    )
    cohorts.append(jax.device_put(batches))
  return cohorts


def measure(
  k: int,
  cohorts: Sequence[fl.ClientBatches],
  runs_per_lane: int | str | None = 'auto',
  process_fn: Callable[[int], fl.LearningProcess] = process_fn,
) -> dict:
  """One row: K runs of `process_fn(seed)` as one program and one after another, on the same
  cohorts: `cohorts[r]` is round r's (device-resident, one shape), round 0 the warm-up."""
  examples = float(np.mean([np.sum(c.mask) for c in cohorts[1:]]))
  lanes = fl.templates.default_runs_per_lane() if runs_per_lane == 'auto' else runs_per_lane
  sweep = fl.templates.build_sweep(process_fn, sweep_runs(k), runs_per_lane=lanes)
  process = sweep.process
  swept = sweep.initialize()
  alone = sweep.unstack(swept)  # the same K initial states, run one after another
  row = {
    'runs': k,
    'runs_per_lane': 'all' if lanes is None else lanes,
    'temp_bytes_per_run': sweep.temp_bytes_per_run(swept, cohorts[0]),
    'temp_bytes_one_run': harness.compiled_temp_bytes(process, cohorts[0]),
  }
  sweep_s, sequential_s = [], []
  for r, batches in enumerate(cohorts):
    (swept, _), seconds = harness.timed(lambda s=swept, b=batches: sweep.next(s, b))
    elapsed = 0.0
    for i, state in enumerate(alone):
      (alone[i], _), t = harness.timed(lambda s=state, b=batches: process.next(s, b))
      elapsed += t
    if r:  # round 0 compiles
      sweep_s.append(seconds)
      sequential_s.append(elapsed)
  row['sweep_round_s'] = statistics.median(sweep_s)
  row['sequential_round_s'] = statistics.median(sequential_s)
  row['sweep_ex_per_s'] = k * examples / row['sweep_round_s']
  row['sequential_ex_per_s'] = k * examples / row['sequential_round_s']
  row['speedup'] = row['sequential_round_s'] / row['sweep_round_s']
  row['max_abs_diff'] = max(
    float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
    for a, b in zip(jax.tree.leaves(swept), jax.tree.leaves(sweep.stack(alone)), strict=True)
  )
  row['peak_rss_bytes'] = harness.peak_rss_bytes()
  return row


COLUMNS = [
  ('runs', 'd'),
  ('runs_per_lane', ''),
  ('sweep_round_s', '.4f'),
  ('sequential_round_s', '.4f'),
  ('sweep_ex_per_s', ',.0f'),
  ('sequential_ex_per_s', ',.0f'),
  ('speedup', '.2f'),
  ('temp_KB_per_run', ',.1f'),
  ('temp_KB_one_run', ',.1f'),
  ('max_abs_diff', '.1e'),
]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--runs', type=int, nargs='*', default=[1, 4, 16])
  parser.add_argument('--rounds', type=int, default=5, help='timed rounds per row')
  parser.add_argument(
    '--runs-per-lane',
    nargs='*',
    default=['auto'],
    help="runs vectorized together, one row per value: an int, 'all' or 'auto' (the backend's)",
  )
  parser.add_argument('--out', default='benchmarks/results/sweep.json')
  args = parser.parse_args(argv)
  if args.rounds < 1 or not args.runs or min(args.runs) < 1:
    print('error: --rounds and --runs must be >= 1', file=sys.stderr)
    return 2
  cohorts = digits_cohorts(load_population(), args.rounds)
  rows = []
  lanes = [None if v == 'all' else v if v == 'auto' else int(v) for v in args.runs_per_lane]
  for k, lane in [(k, lane) for k in args.runs for lane in lanes]:
    row = measure(k, cohorts, lane)
    row['temp_KB_per_run'] = row['temp_bytes_per_run'] / 1024
    row['temp_KB_one_run'] = row['temp_bytes_one_run'] / 1024
    rows.append(row)
    print(harness.format_table(COLUMNS, [row]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  workload = {
    'num_clients': NUM_CLIENTS,
    'cohort': COHORT,
    'batch_size': BATCH_SIZE,
    'epochs': EPOCHS,
    'hidden': HIDDEN,
    'learning_rates': LEARNING_RATES,
  }
  harness.write_json(
    args.out, {'meta': harness.environment(argv), 'workload': workload, 'rows': rows}
  )
  return 0


if __name__ == '__main__':
  sys.exit(main())
