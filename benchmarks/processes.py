"""One process or several: FedAvg round time of WORKLOAD.md's MLP round when the cohort is split
over N processes of one multi-process run on this machine (`fedjax-lite train --processes N`).

Each process is pinned to its share of the cores with single-threaded XLA, batches its own block
of the cohort (`fl.simulation.multihost`), and trains it; one all-reduce per round combines the
blocks. The one-process row is the ordinary round with XLA's own threads on every core. Rows
report the median round time (host batching of the process's block included) and the ratio to
one process; the numbers must agree (the max weight difference from one process is printed).

Usage:
  python benchmarks/processes.py [--processes 1 2] [--rounds 10] [--clients 100]
      [--out benchmarks/results/processes.json]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

COLUMNS = [
  ('processes', 'd'),
  ('clients', 'd'),
  ('round_ms', '.1f'),
  ('x_one_process', '.2f'),
  ('max_weight_diff', '.1e'),
]


def worker(clients: int, rounds: int, result_path: str) -> None:
  """One process of the run (a child of `main`, or the only process)."""
  import jax
  import numpy as np

  import fedjax_lite as fl
  from fedjax_lite.simulation import _multihost as multihost

  distributed = multihost.NUM_PROCESSES_ENV in os.environ
  if distributed:
    multihost.initialize()
  import workload

  mesh = multihost.global_mesh() if distributed else None
  data = workload.SyntheticEmnist.variant('homo').preprocess_batch(workload.to_float)
  model = fl.models.mlp_classifier(workload.NUM_FEATURES, workload.NUM_CLASSES, (200, 200))
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), mesh=mesh
  )

  def batches(round_num: int):
    ids = [int(c) for c in workload.cohort_ids(round_num, workload.POPULATION, clients)]
    if not distributed:
      return jax.device_put(fl.data.batch_cohort(data, ids, batch_size=16, round_num=round_num))
    start, stop, padded = multihost.cohort_block(len(ids), mesh)
    local = fl.data.batch_cohort(data, ids[start:stop], batch_size=16, round_num=round_num)
    return multihost.global_batches(multihost.pad_block(local, stop - start), padded, mesh)

  state, seconds = process.initialize(), []
  for round_num in range(rounds + 1):  # round 0 compiles
    start = time.perf_counter()
    state, _ = process.next(state, batches(round_num))
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
  argv = [sys.executable, os.path.join(here, 'processes.py'), '--worker', str(clients)]
  argv += [str(rounds), result_path]
  if processes == 1:
    subprocess.run(argv, check=True)
    return
  with socket.socket() as probe:
    probe.bind(('127.0.0.1', 0))
    port = probe.getsockname()[1]
  cores = sorted(os.sched_getaffinity(0))
  children = []
  for i in range(processes):
    share = cores[i::processes]
    env = {
      **os.environ,
      'JAX_COORDINATOR_ADDRESS': f'127.0.0.1:{port}',
      'FEDJAX_LITE_NUM_PROCESSES': str(processes),
      'FEDJAX_LITE_PROCESS_ID': str(i),
      'XLA_FLAGS': '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1',
    }
    pin = lambda share=share: os.sched_setaffinity(0, share)
    children.append(subprocess.Popen(argv, env=env, preexec_fn=pin, stderr=subprocess.DEVNULL))
  if any(child.wait() for child in children):
    raise RuntimeError(f'a worker of the {processes}-process run failed')


def main(argv: Sequence[str] | None = None) -> int:
  argv = sys.argv[1:] if argv is None else list(argv)
  if argv and argv[0] == '--worker':
    worker(int(argv[1]), int(argv[2]), argv[3])
    return 0
  import harness
  import numpy as np

  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--processes', type=int, nargs='+', default=[1, 2])
  parser.add_argument('--rounds', type=int, default=10, help='timed rounds')
  parser.add_argument('--clients', type=int, default=100)
  parser.add_argument('--out', default='benchmarks/results/processes.json')
  args = parser.parse_args(argv)
  if len(os.sched_getaffinity(0)) < max(args.processes):
    print(f'error: fewer cores than {max(args.processes)} processes', file=sys.stderr)
    return 2
  rows, base = [], None
  results_dir = os.path.join(os.path.dirname(os.path.abspath(args.out)), 'processes_tmp')
  os.makedirs(results_dir, exist_ok=True)
  for n in args.processes:
    path = os.path.join(results_dir, f'p{n}.npz')
    run(n, args.clients, args.rounds, path)
    with open(path + '.json') as f:
      round_s = json.load(f)['round_s']
    weights = list(np.load(path).values())
    base = base or (round_s, weights)
    diff = max(float(np.max(np.abs(a - b))) for a, b in zip(weights, base[1], strict=True))
    row = {
      'processes': n,
      'clients': args.clients,
      'round_ms': 1e3 * round_s,
      'x_one_process': base[0] / round_s,
      'max_weight_diff': diff,
    }
    rows.append(row)
    print(harness.format_table(COLUMNS, [row]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  harness.write_json(args.out, {'meta': harness.environment(argv), 'rows': rows})
  return 0


if __name__ == '__main__':
  sys.exit(main())
