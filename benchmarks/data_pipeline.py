"""The data pipeline against the round it feeds: host time per cohort, device time per round,
the share of round time the device waits for data with prefetch on, and padding with and
without step buckets.

The population: 100,000 clients with power-law sizes (`fl.data.power_law_partition`, exponent
1.5, at least 2 examples), WORKLOAD.md's 62-class 28x28 images stored as uint8 pixels in an
SQLite file (`fl.data.SQLiteFederatedData`), turned into float32 in [0, 1] by a per-batch hook
(`SyntheticEmnist.power_law` and `to_float` of benchmarks/workload.py; JSON via harness.py).
The model and local training are WORKLOAD.md's (MLP 784-200-200-62, batch 16, 1 epoch, SGD
0.1, server SGD 1.0); clients are capped at `--max-steps` steps (32: 512 examples) and the step
axis is padded to the buckets `fl.data.step_buckets(max_steps, 4)`.

For each cohort size (100, 1,000 clients) it times, over `--rounds` rounds:
  host   `sample_cohort` + `batch_cohort` from SQLite (read, shuffle, pad, hook, align);
  device `process.next` on batches already on the device, to `block_until_ready`;
  serial host then device in one thread, round after round;
  prefetch the same rounds with `fl.data.Prefetcher` building the next cohort on a thread:
         round time, and the share of it spent waiting for data (aim: under 5%).
Padding: the fraction of example slots that are padding when every cohort is padded to
`max_steps` (one shape), to its bucket, or to its own longest client (one shape per length).

Usage:
  python benchmarks/data_pipeline.py [--quick] [--population 100000] [--cohorts 100 1000]
      [--rounds 10] [--out benchmarks/results/data_pipeline.json]
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from collections.abc import Sequence

import harness
import jax
import numpy as np
from workload import BATCH_SIZE, CLIENT_LR, SyntheticEmnist, build_mlp, to_float

import fedjax_lite as fl

MEAN_SIZE = 12  # examples per client on average
MIN_SIZE = 2
EXPONENT = 1.5


def open_population(path: str, num_clients: int) -> tuple[fl.data.FederatedData, float]:
  """The SQLite population at `path`, built first if absent or of another size."""
  build_seconds = 0.0
  if os.path.exists(path):
    data = fl.data.SQLiteFederatedData(path)
    if data.num_clients == num_clients:
      return data.preprocess_batch(to_float), build_seconds
    data.close()
  os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
  start = time.perf_counter()
  population = SyntheticEmnist.power_law(num_clients, MEAN_SIZE, EXPONENT, MIN_SIZE)
  data = fl.data.SQLiteFederatedData.build(population, path, overwrite=True)
  build_seconds = time.perf_counter() - start
  return data.preprocess_batch(to_float), build_seconds


def run_cohort_size(data, process, input_spec, cohort: int, rounds: int, max_steps: int) -> dict:
  buckets = fl.data.step_buckets(max_steps, 4)

  def build(round_num):
    ids = fl.data.sample_cohort(data.num_clients, cohort, round_num, seed=0)
    return fl.data.batch_cohort(
      data,
      [data.client_ids[i] for i in ids],
      batch_size=BATCH_SIZE,
      max_steps=max_steps,
      round_num=round_num,
      buckets=buckets,
    )

  # Compile every bucket's shape before timing anything (all-padding batches).
  state = process.initialize()
  for steps in buckets:
    spec = fl.data.client_batches_spec(input_spec, cohort, steps, BATCH_SIZE)
    zeros = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), spec)
    jax.block_until_ready(process.next(state, zeros))

  host, device = [], []
  padding = {'max_steps': [], 'bucketed': [], 'longest': []}
  shapes = {'bucketed': set(), 'longest': set()}
  for r in range(1, rounds + 1):
    start = time.perf_counter()
    batches = build(r)
    host.append(time.perf_counter() - start)
    on_device = jax.block_until_ready(jax.device_put(batches))
    start = time.perf_counter()
    state = jax.block_until_ready(process.next(state, on_device).state)
    device.append(time.perf_counter() - start)
    # The cohort's real steps end at its longest client: padding to it, or to max_steps.
    real = float(batches.mask.sum())
    longest = int(np.any(batches.mask > 0, axis=(0, 2)).sum())
    padding['bucketed'].append(fl.data.padding_fraction(batches))
    padding['longest'].append(1 - real / (cohort * longest * BATCH_SIZE))
    padding['max_steps'].append(1 - real / (cohort * max_steps * BATCH_SIZE))
    shapes['bucketed'].add(batches.mask.shape[1])
    shapes['longest'].add(longest)

  state = process.initialize()
  start = time.perf_counter()
  for r in range(1, rounds + 1):
    state = jax.block_until_ready(process.next(state, build(r)).state)
  serial_seconds = (time.perf_counter() - start) / rounds

  state = process.initialize()
  with fl.data.Prefetcher(build, stop=rounds + 1, buffer_size=2) as prefetch:
    prefetch(1)  # the first cohort has nothing to hide behind; start the clock after it
    prefetch.wait_seconds = 0.0
    start = time.perf_counter()
    for r in range(2, rounds + 1):
      state = jax.block_until_ready(process.next(state, prefetch(r)).state)
    prefetch_seconds = (time.perf_counter() - start) / (rounds - 1)
    wait = prefetch.wait_seconds / (rounds - 1)

  return {
    'cohort': cohort,
    'buckets': list(buckets),
    'host_seconds': statistics.median(host),
    'device_seconds': statistics.median(device),
    'serial_round_seconds': serial_seconds,
    'prefetch_round_seconds': prefetch_seconds,
    'prefetch_wait_seconds': wait,
    'prefetch_wait_fraction': wait / prefetch_seconds,
    'padding': {k: statistics.mean(v) for k, v in padding.items()},
    'distinct_step_counts': {'max_steps': 1, **{k: len(v) for k, v in shapes.items()}},
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--population', type=int, default=100_000)
  parser.add_argument('--cohorts', type=int, nargs='+', default=[100, 1000])
  parser.add_argument('--rounds', type=int, default=10)
  parser.add_argument('--max-steps', type=int, default=32)
  parser.add_argument('--db', default=None, help='SQLite file (built when absent)')
  parser.add_argument('--quick', action='store_true', help='10k clients, cohort 100, 4 rounds')
  parser.add_argument('--out', default='benchmarks/results/data_pipeline.json')
  args = parser.parse_args(argv)
  meta = harness.environment(argv)
  if args.quick:
    args.population, args.cohorts, args.rounds = 10_000, [100], 4
  db = args.db or f'benchmarks/results/population_{args.population}.sqlite'
  data, build_seconds = open_population(db, args.population)
  sizes = data.client_sizes
  print(
    f'population: {data.num_clients:,} clients, {int(sizes.sum()):,} examples '
    f'(sizes {int(sizes.min())}..{int(sizes.max())}, median {int(np.median(sizes))}), '
    f'{os.path.getsize(db) / 1e6:.0f} MB at {db}'
    + (f', built in {build_seconds:.1f}s' if build_seconds else ' (reused)')
  )
  model = build_mlp()
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(CLIENT_LR))
  results = []
  header = (
    f'{"cohort":>6} {"host ms":>8} {"device ms":>9} {"serial ms":>9} {"prefetch ms":>11} '
    f'{"wait %":>6} {"pad max_steps":>13} {"pad bucketed":>12} {"pad longest":>11} {"shapes":>9}'
  )
  print(header)
  for cohort in args.cohorts:
    row = run_cohort_size(data, process, model.input_spec, cohort, args.rounds, args.max_steps)
    results.append(row)
    pad, shapes = row['padding'], row['distinct_step_counts']
    print(
      f'{cohort:>6} {1e3 * row["host_seconds"]:>8.1f} {1e3 * row["device_seconds"]:>9.1f} '
      f'{1e3 * row["serial_round_seconds"]:>9.1f} {1e3 * row["prefetch_round_seconds"]:>11.1f} '
      f'{100 * row["prefetch_wait_fraction"]:>6.1f} {pad["max_steps"]:>13.3f} '
      f'{pad["bucketed"]:>12.3f} {pad["longest"]:>11.3f} '
      f'{shapes["bucketed"]:>4}/{shapes["longest"]:<4}'
    )
  out = {
    'meta': meta,
    'benchmark': 'data_pipeline',
    'date': datetime.date.today().isoformat(),
    'environment': {
      'platform': meta['platform'],
      'python': meta['python'],
      'jax': meta['jax_version'],
      'backend': meta['backend'],
      'devices': [str(d) for d in jax.devices()],
      'cpu_count': meta['cpu_count'],
    },
    'population': {
      'num_clients': data.num_clients,
      'num_examples': int(sizes.sum()),
      'build_seconds': build_seconds,
      'file_mb': os.path.getsize(db) / 1e6,
    },
    'config': vars(args),
    'results': results,
  }
  harness.write_json(args.out, out)
  return 0


if __name__ == '__main__':
  sys.exit(main())
