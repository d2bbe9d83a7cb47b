"""One process or several: FedAvg round time of WORKLOAD.md's MLP round when the cohort is split
over N processes of one multi-process run on this machine (`fedjax-lite train --processes N`).

Every row times the path users run, as benchmarks/scaling.py does: the clients are in memory
before the clock starts (uint8 pixels, made floats by a per-batch hook), and each round's
`fl.data.batch_cohort` is built on a thread by `fl.data.Prefetcher` while the previous round
runs. The one-process row is `fedjax-lite train` (XLA's own threads on every core). In an
N-process row each process is pinned to its share of the cores with single-threaded XLA,
prefetches its own block of the cohort (`fl.simulation.multihost`), and trains it; one
all-reduce per round combines the blocks. Rows report the median round time (whatever wait for
the prefetched batches is left included), client-examples per second, the ratio to the
centralized bound (the round's examples pooled, batch-16 SGD in one `lax.scan`, timed in this
run on the same cohorts) and to one process; the numbers must agree (the max weight difference
from one process is printed).

Usage:
  python benchmarks/multiprocess.py [--processes 1 2] [--clients 100 1000] [--rounds 10]
      [--out benchmarks/results/multiprocess.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import harness
import jax
import numpy as np
import workload

import fedjax_lite as fl
from fedjax_lite.simulation import multihost

COLUMNS = [
  ('processes', 'd'),
  ('clients', 'd'),
  ('round_ms', '.1f'),
  ('ex_per_s', ',.0f'),
  ('x_bound', '.2f'),
  ('x_one_process', '.2f'),
  ('max_weight_diff', '.1e'),
]


def worker(clients: int, rounds: int, result_path: str) -> None:
  """One process of the run (a child of `main`, or the only process)."""
  distributed = multihost.NUM_PROCESSES_ENV in os.environ
  if distributed:  # before any computation (importing JAX does not start it)
    multihost.initialize()
  mesh = multihost.global_mesh() if distributed else None
  model = fl.models.mlp_classifier(workload.NUM_FEATURES, workload.NUM_CLASSES, (200, 200))
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), mesh=mesh
  )
  cohorts = [
    [int(c) for c in workload.cohort_ids(r, workload.POPULATION, clients)]
    for r in range(rounds + 1)
  ]
  if distributed:  # this process's block of every cohort
    blocks = [multihost.cohort_block(len(ids), mesh) for ids in cohorts]
    needed = {
      c for ids, (start, stop, _) in zip(cohorts, blocks, strict=True) for c in ids[start:stop]
    }
  else:
    needed = {c for ids in cohorts for c in ids}
  # The rounds' clients are made before the clock starts: data already in memory (WORKLOAD.md).
  source = workload.SyntheticEmnist.variant('homo', uint8=True)
  data = fl.data.InMemoryFederatedData({c: source.get_client(c) for c in sorted(needed)})
  data = data.preprocess_batch(workload.to_float)

  def batches(round_num: int):  # what `fedjax-lite train`'s prefetch thread builds
    ids = cohorts[round_num]
    if not distributed:
      return fl.data.batch_cohort(data, ids, batch_size=16, round_num=round_num)
    start, stop, padded = blocks[round_num]
    local = fl.data.batch_cohort(data, ids[start:stop], batch_size=16, round_num=round_num)
    return multihost.global_batches(multihost.pad_block(local, stop - start), padded, mesh)

  state, seconds = process.initialize(), []
  with fl.data.Prefetcher(batches, stop=rounds + 1) as prefetch:
    for round_num in range(rounds + 1):  # round 0 compiles
      start = time.perf_counter()
      state, _ = process.next(state, prefetch(round_num))
      jax.block_until_ready(state)
      seconds.append(time.perf_counter() - start)
  weights = multihost.to_host(process.get_model_weights(state))
  if not distributed or multihost.is_primary():
    np.savez(result_path, *jax.tree.leaves(weights))
    with open(result_path + '.json', 'w') as f:
      json.dump({'round_s': statistics.median(seconds[1:])}, f)


def run(processes: int, clients: int, rounds: int, result_path: str) -> None:
  """Runs `worker` as `processes` pinned processes (or in a child process for 1)."""
  here = os.path.dirname(os.path.abspath(__file__))
  argv = [sys.executable, os.path.join(here, 'multiprocess.py'), '--worker', str(clients)]
  argv += [str(rounds), result_path]
  if processes == 1:
    subprocess.run(argv, check=True)
  elif multihost.launch(argv, processes):
    raise RuntimeError(f'a worker of the {processes}-process run failed')


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == '--worker':
    worker(int(argv[1]), int(argv[2]), argv[3])
    return 0
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--clients', type=int, nargs='+', default=[100, 1000])
  parser.add_argument('--rounds', type=int, default=10, help='timed rounds')
  parser.add_argument('--out', default='benchmarks/results/multiprocess.json')
  args = parser.parse_args(argv)
  if len(os.sched_getaffinity(0)) < max(args.processes):
    print(f'error: fewer cores than {max(args.processes)} processes', file=sys.stderr)
    return 2
  rows = []
  results_dir = tempfile.mkdtemp(prefix='multiprocess_')  # the workers' final weights
  for clients in args.clients:
    bound_s = centralized_bound(clients, args.rounds)
    base = None
    for n in args.processes:
      path = os.path.join(results_dir, f'p{n}_c{clients}.npz')
      run(n, clients, args.rounds, path)
      with open(path + '.json') as f:
        round_s = json.load(f)['round_s']
      weights = list(np.load(path).values())
      base = base or (round_s, weights)
      diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, base[1], strict=True))
      row = {
        'processes': n,
        'clients': clients,
        'round_ms': 1e3 * round_s,
        'ex_per_s': clients * workload.HOMO_SIZE / round_s,
        'x_bound': bound_s / round_s,
        'x_one_process': base[0] / round_s,
        'max_weight_diff': diff,
      }
      rows.append(row)
      print(harness.format_table(COLUMNS, [row]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  harness.write_json(args.out, {'meta': harness.environment(argv), 'rows': rows})
  return 0


def centralized_bound(clients: int, rounds: int) -> float:
  """Median seconds of the centralized bound on the same cohorts (this process, all cores)."""
  model = fl.models.mlp_classifier(workload.NUM_FEATURES, workload.NUM_CLASSES, (200, 200))
  central = workload.Centralized(model, workload.BATCH_SIZE)
  data = workload.SyntheticEmnist.variant('homo').preprocess_batch(workload.to_float)
  trainable, seconds = model.initial_weights.trainable, []
  for r in range(rounds + 1):
    ids = [int(c) for c in workload.cohort_ids(r, workload.POPULATION, clients)]
    batches = fl.data.batch_cohort(data, ids, batch_size=workload.BATCH_SIZE, round_num=r)
    cohort = workload.real_examples(batches)
    fn, fn_args = central.prepare(trainable, cohort, r)
    _, elapsed = harness.timed(lambda fn=fn, fn_args=fn_args: fn(trainable, *fn_args))
    seconds.append(elapsed)
  return statistics.median(seconds[1:])


if __name__ == '__main__':
  sys.exit(main())
