"""The algorithm catalogue: what each costs per round, and what it reaches on a non-IID split.

Two tables, one run:

1. **Round time relative to FedAvg**: WORKLOAD.md's MLP round (784-200-200-62, 100 `homo`
   clients a round, batch 16, one epoch, client SGD 0.1), each algorithm of `fedjax-lite train`
   built as the command builds it, on batches already on the device; the median of
   `--timed-rounds` rounds after one compiling round. SCAFFOLD's time includes reading and
   writing the cohort's control variates in an in-memory client-state store (its state traffic).
2. **Accuracy after `--rounds` rounds** on digits split Dirichlet(0.1) over 30 clients (10 a
   round, 2 local epochs, batch 16): for each algorithm the client learning rate (FedSGD: the
   server's) is tuned over `--learning-rates` on the mean over `--seeds` seeds, and the table
   shows the best one's test accuracy, mean ± std over the seeds.

Usage:
  python benchmarks/algorithms.py [--rounds 40] [--seeds 0 1 2]
      [--learning-rates 0.03 0.1 0.3] [--timed-rounds 5] [--parts time accuracy]
      [--out benchmarks/results/algorithms.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence

import harness
import jax
import numpy as np
import workload

import fedjax_lite as fl
from fedjax_lite import _catalogue, _config, _experiment, simulation

ALGORITHMS = [n for n, a in _catalogue.ALGORITHMS.items() if a.model == 'classifier']
TIME_COLUMNS = [('algorithm', ''), ('round_ms', '.1f'), ('x_fedavg', '.2f')]
ACCURACY_COLUMNS = [
  ('algorithm', ''),
  ('tuned_lr', 'g'),
  ('accuracy', '.4f'),
  ('accuracy_std', '.4f'),
]


def _settings(name: str) -> dict:
  return _catalogue.with_defaults(_config.resolve({}, {'algorithm': name}), {'algorithm'})


def round_time(name: str, batches, ids, timed_rounds: int) -> float:
  model = fl.models.mlp_classifier(workload.NUM_FEATURES, workload.NUM_CLASSES, (200, 200))
  inputs = _catalogue.BuildInputs(model, fl.aggregators.MeanFactory(), None, workload.POPULATION)
  process = _catalogue.ALGORITHMS[name].build(_settings(name), inputs)
  store = None
  if process.initial_client_state is not None:
    store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
  state, seconds = process.initialize(), []
  for _ in range(timed_rounds + 1):
    start = time.perf_counter()
    if store is None:
      state, _ = process.next(state, batches)
    else:
      state, _, client_states = process.next(state, batches, store.get(ids))
      store.put(ids, client_states)
    jax.block_until_ready(state)
    seconds.append(time.perf_counter() - start)
  return statistics.median(seconds[1:])


def final_accuracy(name: str, learning_rate: float, seed: int, rounds: int) -> float:
  lr_setting = 'client_lr' if 'client_lr' in _catalogue.ALGORITHMS[name].reads else 'server_lr'
  given = {'algorithm': name, 'alpha': 0.1, 'seed': seed, lr_setting: learning_rate}
  config = _catalogue.with_defaults(_config.resolve({}, given), set(given))
  experiment = _experiment.build_experiment(config)
  store = None
  if experiment.process.initial_client_state is not None:
    store = fl.simulation.InMemoryClientStateStore(experiment.process.initial_client_state)
  state = simulation.run_training_process(
    experiment.process,
    experiment.training_data_fn,
    rounds,
    client_state_store=store,
    cohort_ids_fn=experiment.cohort_ids_fn if store is not None else None,
  )
  metrics = experiment.evaluation_fn(state, experiment.evaluation_data)
  accuracy = float(simulation.flatten_metrics(metrics)['accuracy'])
  return accuracy if np.isfinite(accuracy) else 0.0


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=40)
  parser.add_argument('--seeds', type=int, nargs='+', default=[0, 1, 2])
  parser.add_argument('--learning-rates', type=float, nargs='+', default=[0.03, 0.1, 0.3])
  parser.add_argument('--timed-rounds', type=int, default=5)
  parser.add_argument('--algorithms', nargs='+', default=ALGORITHMS, choices=ALGORITHMS)
  parser.add_argument(
    '--parts', nargs='+', default=['time', 'accuracy'], choices=['time', 'accuracy']
  )
  parser.add_argument('--out', default='benchmarks/results/algorithms.json')
  args = parser.parse_args(argv)
  if args.rounds < 1 or args.timed_rounds < 1:
    print('error: --rounds and --timed-rounds must be >= 1', file=sys.stderr)
    return 2
  data = workload.SyntheticEmnist.variant('homo').preprocess_batch(workload.to_float)
  ids = [int(c) for c in workload.cohort_ids(0)]
  batches = jax.device_put(fl.data.batch_cohort(data, ids, batch_size=16, round_num=0))
  times = []
  for name in args.algorithms if 'time' in args.parts else []:
    times.append(
      {'algorithm': name, 'round_ms': 1e3 * round_time(name, batches, ids, args.timed_rounds)}
    )
    times[-1]['x_fedavg'] = times[-1]['round_ms'] / times[0]['round_ms']
    print(harness.format_table(TIME_COLUMNS, times[-1:]).splitlines()[-1], flush=True)
  accuracies = []
  for name in args.algorithms if 'accuracy' in args.parts else []:
    by_lr = {
      lr: [final_accuracy(name, lr, seed, args.rounds) for seed in args.seeds]
      for lr in args.learning_rates
    }
    best = max(by_lr, key=lambda lr: np.mean(by_lr[lr]))
    accuracies.append(
      {
        'algorithm': name,
        'tuned_lr': best,
        'accuracy': float(np.mean(by_lr[best])),
        'accuracy_std': float(np.std(by_lr[best])),
        'by_learning_rate': {str(lr): v for lr, v in by_lr.items()},
      }
    )
    print(harness.format_table(ACCURACY_COLUMNS, accuracies[-1:]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(TIME_COLUMNS, times))
  print()
  print(harness.format_table(ACCURACY_COLUMNS, accuracies))
  results = {'round_time': times, 'accuracy': accuracies, 'rounds': args.rounds}
  harness.write_json(args.out, {'meta': harness.environment(argv), **results})
  return 0


if __name__ == '__main__':
  sys.exit(main())
