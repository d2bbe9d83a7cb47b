"""How a FedAvg round scales with the cohort and the devices: seconds per round,
client-examples/s, XLA's compiled temporary bytes and the process's peak RSS.

The workload is benchmarks/WORKLOAD.md's (`homo`: 64 examples per client, batch 16, one local
epoch, so 4 steps per client; client SGD 0.1, server SGD 1.0) with the population grown to the
largest cohort. The clients of the measured rounds are made before the clock starts and held in
memory (`fl.data.InMemoryFederatedData`) with uint8 pixels, turned into floats by a per-batch
hook. The timed path is the one users run: `fl.data.batch_cohort`
with step buckets, built on a thread by `fl.data.Prefetcher` while the previous round runs.

Rows:
  cohort    MLP at 10, 100, 1,000, 10,000 clients per round; CNN at 10, 100, 1,000 (one device);
  devices   the MLP at `--device-clients` clients on 1, 2, 4, 8 forced CPU devices (`mesh=`).
Each row runs in its own process (so the forced device count applies and the peak RSS is its
own), times `--rounds` rounds after one warm-up round, and, on one device, times on the same
cohorts the centralized bound (the round's examples pooled, batch-16 SGD in one `lax.scan`) and a
Python loop of jitted per-client scans: the ratios come from the same process.

Usage:
  python benchmarks/scaling.py [--quick] [--mlp-clients 10 100 1000 10000]
      [--cnn-clients 10 100 1000] [--devices 1 2 4 8] [--device-clients 1000] [--rounds 3]
      [--out benchmarks/results/scaling.json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from collections.abc import Sequence

import harness
import jax
import numpy as np
import workload
from jax.sharding import Mesh

import fedjax_lite as fl

STEPS = -(-workload.HOMO_SIZE // workload.BATCH_SIZE)  # 4 local steps per client


def measure(model_name: str, clients: int, devices: int, rounds: int, references: bool) -> dict:
  """One row, in this process: the round's time, memory and (optionally) its references."""
  model = workload.build_mlp() if model_name == 'mlp' else workload.build_cnn()
  population = max(workload.POPULATION, clients)
  # The rounds' clients are made before the clock starts: data already in memory (WORKLOAD.md).
  source = workload.SyntheticEmnist.variant('homo', population, uint8=True)
  needed = {int(c) for r in range(rounds + 1) for c in workload.cohort_ids(r, population, clients)}
  data = fl.data.InMemoryFederatedData({c: source.get_client(c) for c in sorted(needed)})
  data = data.preprocess_batch(workload.to_float)
  if model_name == 'cnn':
    data = data.preprocess_batch(lambda b: workload.as_model_input('cnn', b))
  mesh = Mesh(np.array(jax.devices()[:devices]), ('clients',)) if devices > 1 else None
  process = fl.algorithms.build_weighted_fed_avg(
    model,
    fl.optimizers.build_sgdm(workload.CLIENT_LR),
    fl.optimizers.build_sgdm(workload.SERVER_LR),
    mesh=mesh,
  )
  buckets = fl.data.step_buckets(STEPS, 4)

  def build(round_num):
    ids = workload.cohort_ids(round_num, population, clients)
    return fl.data.batch_cohort(
      data,
      [int(c) for c in ids],
      batch_size=workload.BATCH_SIZE,
      round_num=round_num,
      buckets=buckets,
    )

  spec = fl.data.client_batches_spec(model.input_spec, clients, STEPS, workload.BATCH_SIZE)
  row = {
    'model': model_name,
    'clients': clients,
    'devices': devices,
    'temp_bytes': harness.compiled_temp_bytes(process, spec),
  }
  seconds, state = [], process.initialize()
  with fl.data.Prefetcher(build, stop=rounds + 1, buffer_size=1) as prefetch:
    for r in range(rounds + 1):
      (state, _), elapsed = harness.timed(lambda r=r, s=state: process.next(s, prefetch(r)))
      if r:  # round 0 compiles
        seconds.append(elapsed)
  examples = clients * workload.HOMO_SIZE
  row['round_s'] = statistics.median(seconds)
  row['ex_per_s'] = examples / row['round_s']
  row['prefetch_wait_s'] = prefetch.wait_seconds / (rounds + 1)
  row['peak_rss_bytes'] = harness.peak_rss_bytes()  # before the references allocate theirs
  if references:
    row.update(_references(model, data, population, clients, rounds))
    row['x_bound'] = row['ex_per_s'] / row['bound_ex_per_s']
    row['x_loop'] = row['ex_per_s'] / row['loop_ex_per_s']
  return row


def _references(model, data, population, clients, rounds) -> dict:
  """The centralized bound and a Python loop over clients on the same cohorts."""
  central = workload.Centralized(model, workload.BATCH_SIZE)
  loop = workload.PythonLoopFedAvg(model)
  trainable = model.initial_weights.trainable
  bound_s, loop_s = [], []
  for r in range(rounds + 1):
    ids = [int(c) for c in workload.cohort_ids(r, population, clients)]
    batches = fl.data.batch_cohort(data, ids, batch_size=workload.BATCH_SIZE, round_num=r)
    cohort = workload.real_examples(batches)
    fn, args = central.prepare(trainable, cohort, r)
    _, bound = harness.timed(lambda fn=fn, args=args: fn(trainable, *args))
    _, looped = harness.timed(lambda b=batches: loop.round(trainable, b))
    if r:
      bound_s.append(bound)
      loop_s.append(looped)
  examples = clients * workload.HOMO_SIZE
  return {
    'bound_ex_per_s': examples / statistics.median(bound_s),
    'loop_ex_per_s': examples / statistics.median(loop_s),
  }


def run_row(model_name: str, clients: int, devices: int, rounds: int, references: bool) -> dict:
  """Runs `measure` in a fresh process with `devices` forced CPU devices."""
  env = dict(os.environ)
  flags = re.sub(r'--xla_force_host_platform_device_count=\S*', '', env.get('XLA_FLAGS', ''))
  env['XLA_FLAGS'] = f'{flags} --xla_force_host_platform_device_count={devices}'.strip()
  cmd = [sys.executable, __file__, '--row', model_name, str(clients), str(devices), str(rounds)]
  if references:
    cmd.append('--references')
  out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
  if out.returncode:
    raise RuntimeError(f'{model_name} x {clients} on {devices} devices failed:\n{out.stderr}')
  return json.loads(out.stdout.strip().splitlines()[-1])


COLUMNS = [
  ('model', ''),
  ('clients', ','),
  ('devices', 'd'),
  ('round_s', '.3f'),
  ('ex_per_s', ',.0f'),
  ('x_bound', '.2f'),
  ('x_loop', '.2f'),
  ('x_1_device', '.2f'),
  ('temp_MB', ',.1f'),
  ('peak_rss_MB', ',.0f'),
]


def plot(rows: Sequence[dict], path: str) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, (time_ax, memory_ax) = plt.subplots(1, 2, figsize=(10, 4))
  for model_name in ('mlp', 'cnn'):
    series = [r for r in rows if r['model'] == model_name and r['devices'] == 1]
    if not series:
      continue
    x = [r['clients'] for r in series]
    time_ax.plot(x, [r['round_s'] for r in series], 'o-', label=model_name.upper())
    memory_ax.plot(x, [r['temp_bytes'] / 2**20 for r in series], 'o-', label=model_name.upper())
  for ax, ylabel in [(time_ax, 'seconds per round'), (memory_ax, 'compiled temporaries (MiB)')]:
    ax.set_xscale('log')
    ax.set_yscale('log')
    ax.set_xlabel('clients per round')
    ax.set_ylabel(ylabel)
    ax.legend()
  time_ax.set_title('time: linear in the cohort')
  memory_ax.set_title('memory: flat past one chunk')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  print(f'wrote {path}')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--mlp-clients', type=int, nargs='*', default=[10, 100, 1000, 10000])
  parser.add_argument('--cnn-clients', type=int, nargs='*', default=[10, 100, 1000])
  parser.add_argument('--devices', type=int, nargs='*', default=[1, 2, 4, 8])
  parser.add_argument('--device-clients', type=int, default=1000)
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds per row')
  parser.add_argument('--quick', action='store_true', help='small cohorts, 2 timed rounds')
  parser.add_argument('--out', default='benchmarks/results/scaling.json')
  parser.add_argument('--row', nargs=4, help=argparse.SUPPRESS)
  parser.add_argument('--references', action='store_true', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.row:
    model_name, clients, devices, rounds = args.row
    row = measure(model_name, int(clients), int(devices), int(rounds), args.references)
    print(json.dumps(row))
    return 0
  if args.quick:
    args.mlp_clients, args.cnn_clients = [10, 100], [10]
    args.devices, args.device_clients, args.rounds = [1, 2, 8], 100, 2
  if args.rounds < 1 or any(n < 1 for n in (*args.mlp_clients, *args.cnn_clients, *args.devices)):
    print('error: --rounds, clients and devices must be >= 1', file=sys.stderr)
    return 2

  plan = [('mlp', n, 1) for n in args.mlp_clients] + [('cnn', n, 1) for n in args.cnn_clients]
  plan += [('mlp', args.device_clients, d) for d in args.devices if d > 1]
  if any(d > 1 for d in args.devices) and args.device_clients not in args.mlp_clients:
    plan.insert(0, ('mlp', args.device_clients, 1))
  rows = []
  for model_name, clients, devices in plan:
    row = run_row(model_name, clients, devices, args.rounds, references=devices == 1)
    row['temp_MB'] = row['temp_bytes'] / 2**20
    row['peak_rss_MB'] = row['peak_rss_bytes'] / 2**20
    single = [
      r for r in rows if (r['model'], r['clients'], r['devices']) == (model_name, clients, 1)
    ]
    if devices > 1 and single:
      row['x_1_device'] = row['ex_per_s'] / single[0]['ex_per_s']
    rows.append(row)
    print(harness.format_table(COLUMNS, [row]).splitlines()[-1], flush=True)
  print()
  print(harness.format_table(COLUMNS, rows))
  results = {'meta': harness.environment(argv), 'steps_per_client': STEPS, 'rows': rows}
  harness.write_json(args.out, results)
  plot(rows, os.path.splitext(args.out)[0] + '.png')
  return 0


if __name__ == '__main__':
  sys.exit(main())
