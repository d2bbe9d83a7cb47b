"""The cost of each aggregator: round time and compiled temporaries of a FedAvg round relative to
the plain weighted mean, at 100 and 1,000 clients per round.

The workload is benchmarks/WORKLOAD.md's MLP round (`homo`: 64 examples, batch 16, one epoch,
client SGD 0.1) on batches already built and on the device, so the table isolates the
aggregation. Streamed aggregators (mean, clipping, zeroing, compression, secure sum, the
presets, DP) run inside the cohort loop; the robust reductions (median, trimmed mean, Krum) need
every client's update at once and are given the stacked `[clients, ...]` updates, so their
memory grows with the cohort.

Usage:
  python benchmarks/aggregators.py [--quick] [--clients 100 1000] [--rounds 5]
      [--out benchmarks/results/aggregators.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import harness
import jax
import numpy as np
import workload

import fedjax_lite as fl

AGG = fl.aggregators
STEPS = -(-workload.HOMO_SIZE // workload.BATCH_SIZE)

AGGREGATORS = {
  'mean': (fl.algorithms.build_weighted_fed_avg, lambda n: AGG.MeanFactory()),
  'clipping (adaptive)': (
    fl.algorithms.build_weighted_fed_avg,
    lambda n: AGG.default_clipping(AGG.MeanFactory()),
  ),
  'zeroing (adaptive)': (
    fl.algorithms.build_weighted_fed_avg,
    lambda n: AGG.default_zeroing(AGG.MeanFactory()),
  ),
  'robust_aggregator': (fl.algorithms.build_weighted_fed_avg, lambda n: AGG.robust_aggregator()),
  'compression_aggregator': (
    fl.algorithms.build_weighted_fed_avg,
    lambda n: AGG.compression_aggregator(),
  ),
  'secure_aggregator': (fl.algorithms.build_weighted_fed_avg, lambda n: AGG.secure_aggregator()),
  'DP gaussian_fixed': (
    fl.algorithms.build_unweighted_fed_avg,
    lambda n: AGG.DifferentiallyPrivateFactory.gaussian_fixed(1.0, n, 0.5),
  ),
  'dp_aggregator': (fl.algorithms.build_unweighted_fed_avg, lambda n: AGG.dp_aggregator(1.0, n)),
  'median (stacked)': (fl.algorithms.build_unweighted_fed_avg, lambda n: AGG.median_factory()),
  'trimmed mean 0.1 (stacked)': (
    fl.algorithms.build_unweighted_fed_avg,
    lambda n: AGG.trimmed_mean_factory(0.1),
  ),
  'krum f=10 (stacked)': (
    fl.algorithms.build_unweighted_fed_avg,
    lambda n: AGG.krum_factory(10),
  ),
}


def tile_cohort(batches: fl.ClientBatches, clients: int) -> fl.ClientBatches:
  """`batches` repeated along the client axis to `clients` clients, each with its own id."""
  n = batches.mask.shape[0]
  take = np.arange(clients) % n
  return fl.ClientBatches(
    jax.tree.map(lambda x: np.asarray(x)[take], batches.batch),
    np.asarray(batches.mask)[take],
    np.arange(clients, dtype=np.uint32),
  )


def measure(name: str, clients: int, rounds: int, batches: fl.ClientBatches) -> dict:
  builder, factory = AGGREGATORS[name]
  model = workload.build_mlp()
  process = builder(
    model, fl.optimizers.build_sgdm(workload.CLIENT_LR), model_aggregator=factory(clients)
  )
  spec = fl.data.client_batches_spec(model.input_spec, clients, STEPS, workload.BATCH_SIZE)
  temp = harness.compiled_temp_bytes(process, spec)
  state = process.initialize()
  seconds = []
  for r in range(rounds + 1):
    (state, _), elapsed = harness.timed(lambda s=state: process.next(s, batches))
    if r:  # round 0 compiles
      seconds.append(elapsed)
  return {
    'aggregator': name,
    'clients': clients,
    'round_s': statistics.median(seconds),
    'temp_bytes': temp,
  }


COLUMNS = [
  ('aggregator', ''),
  ('clients', ','),
  ('round_s', '.3f'),
  ('x_mean_time', '.2f'),
  ('temp_MB', ',.1f'),
  ('x_mean_memory', '.2f'),
]


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--clients', type=int, nargs='+', default=[100, 1000])
  parser.add_argument('--rounds', type=int, default=5, help='timed rounds per row')
  parser.add_argument('--quick', action='store_true', help='100 clients, 2 timed rounds')
  parser.add_argument('--out', default='benchmarks/results/aggregators.json')
  args = parser.parse_args(argv)
  if args.quick:
    args.clients, args.rounds = [100], 2
  if args.rounds < 1 or any(n < 1 for n in args.clients):
    print('error: --rounds and --clients must be >= 1', file=sys.stderr)
    return 2
  data = workload.SyntheticEmnist.variant('homo').preprocess_batch(workload.to_float)
  rows = []
  for clients in args.clients:
    ids = [int(c) for c in workload.cohort_ids(0, workload.POPULATION, min(clients, 1000))]
    batches = fl.data.batch_cohort(data, ids, batch_size=workload.BATCH_SIZE, round_num=0)
    # A cohort larger than the population repeats its clients' data (ids stay distinct).
    batches = jax.device_put(tile_cohort(batches, clients))
    base = None
    for name in AGGREGATORS:
      row = measure(name, clients, args.rounds, batches)
      base = base or row
      row['x_mean_time'] = row['round_s'] / base['round_s']
      row['temp_MB'] = row['temp_bytes'] / 2**20
      row['x_mean_memory'] = row['temp_bytes'] / base['temp_bytes']
      rows.append(row)
      print(harness.format_table(COLUMNS, [row]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  harness.write_json(args.out, {'meta': harness.environment(argv), 'rows': rows})
  return 0


if __name__ == '__main__':
  sys.exit(main())
