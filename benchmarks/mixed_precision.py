"""Mixed precision: what bfloat16 compute (float32 master weights and sums) does to accuracy and
round time, on the command's main job and on the reference MLP round.

Rows:
- `digits main job`: `fedjax-lite train`'s defaults (FedAvg, MLP 64-200-200-10, 30 rounds of 10
  clients, digits split Dirichlet(0.5) over 30), once per compute dtype: final test accuracy and
  loss, and the median round time.
- `workload MLP round`: benchmarks/WORKLOAD.md's round (MLP 784-200-200-62, 100 `homo`
  clients), the median round time and compiled temporaries per dtype.

bfloat16 pays off where the hardware has bfloat16 units (TPUs, recent GPUs); a CPU without them
emulates it, so expect no speed-up there: the CPU rows measure the accuracy cost.

Usage:
  python benchmarks/mixed_precision.py [--rounds 30] [--timed-rounds 5]
      [--out benchmarks/results/mixed_precision.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Sequence

import harness
import jax
import jax.numpy as jnp
import workload

import fedjax_lite as fl
from fedjax_lite import _config, _experiment, simulation

DTYPES = ('float32', 'bfloat16')
COLUMNS = [
  ('row', ''),
  ('dtype', ''),
  ('test_accuracy', '.4f'),
  ('test_loss', '.4f'),
  ('round_ms', '.1f'),
  ('temp_MB', '.2f'),
]


def main_job(dtype: str, rounds: int) -> dict:
  config = _config.resolve({}, {'compute_dtype': dtype, 'rounds': rounds})
  experiment = _experiment.build_experiment(config)
  state, seconds = experiment.process.initialize(), []
  for round_num in range(1, rounds + 1):
    batches = experiment.training_data_fn(round_num)
    (state, _), elapsed = harness.timed(lambda s=state, b=batches: experiment.process.next(s, b))
    seconds.append(elapsed)
  final = simulation.flatten_metrics(experiment.evaluation_fn(state, experiment.evaluation_data))
  return {
    'row': 'digits main job',
    'dtype': dtype,
    'test_accuracy': final['accuracy'],
    'test_loss': final['loss'],
    'round_ms': 1e3 * statistics.median(seconds[1:]),  # round 1 compiles
  }


def workload_round(dtype: str, timed_rounds: int) -> dict:
  model = fl.models.mlp_classifier(784, 62, hidden=(200, 200))
  if dtype != 'float32':
    model = fl.models.with_compute_dtype(model, jnp.dtype(dtype))
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0)
  )
  data = workload.SyntheticEmnist.variant('homo').preprocess_batch(workload.to_float)
  ids = [int(c) for c in workload.cohort_ids(0, workload.POPULATION, 100)]
  batches = jax.device_put(
    fl.data.batch_cohort(data, ids, batch_size=workload.BATCH_SIZE, round_num=0)
  )
  temp = harness.compiled_temp_bytes(process, jax.eval_shape(lambda: batches))
  state, seconds = process.initialize(), []
  for _ in range(timed_rounds + 1):
    (state, _), elapsed = harness.timed(lambda s=state: process.next(s, batches))
    seconds.append(elapsed)
  return {
    'row': 'workload MLP round',
    'dtype': dtype,
    'round_ms': 1e3 * statistics.median(seconds[1:]),
    'temp_MB': temp / 2**20,
  }


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=30, help='main-job rounds')
  parser.add_argument('--timed-rounds', type=int, default=5, help='workload rounds timed')
  parser.add_argument('--out', default='benchmarks/results/mixed_precision.json')
  args = parser.parse_args(argv)
  if args.rounds < 2 or args.timed_rounds < 1:
    print('error: --rounds must be >= 2 and --timed-rounds >= 1', file=sys.stderr)
    return 2
  rows = []
  for measure, n in [(main_job, args.rounds), (workload_round, args.timed_rounds)]:
    for dtype in DTYPES:
      rows.append(measure(dtype, n))
      print(harness.format_table(COLUMNS, rows[-1:]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  harness.write_json(args.out, {'meta': harness.environment(argv), 'rows': rows})
  return 0


if __name__ == '__main__':
  sys.exit(main())
