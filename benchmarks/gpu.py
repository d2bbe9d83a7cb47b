"""One run for a GPU (H100/H200): FedAvg round throughput against the device's own bounds, the
compiled round's temporaries, and sweeps against sequential runs, within a time budget.

Rows, most important first (every configuration's small case, then the largest of each):
  refs    the round's examples pooled on one model, one jitted `lax.scan` each: the centralized
          bound (batch 16) and the batch-1,600 ceiling (`workload.Centralized`), with their
          compiled temporaries;
  fedavg  WORKLOAD.md's `homo` round (64 examples, 4 steps of 16 per client) with
          `build_weighted_fed_avg(..., client_chunk_size=K)` for the MLP and the EMNIST CNN at
          100, 1,000 and 10,000 clients and K = 64, 256, 1,024: client-examples/s, the ratio to
          that cohort's bound and ceiling, XLA's compiled temporaries of `next`;
  sweep   `sweep.measure` (benchmarks/sweep.py) on the fedavg rows' MLP round and cohort
          (`--sweep-clients`, 100 clients a round, chunk the backend's default) at K = 1, 16, 64,
          256 runs (client learning rates 0.03/0.1/0.3 and seeds differing), all K vectorized on
          an accelerator (`runs_per_lane` the backend's default): the sweep program's round
          against K runs one after another (design target: >= 8x at K = 64 on an H100).
A (model, clients) cohort is made once (round 0's ids), put on the device before any clock
starts, and every round of its rows runs on it: the rows time the compiled program, not the host
(data_pipeline.py and scaling.py time the host's part). Each row: 1 warm-up round (compilation),
then `--rounds` timed rounds, the median reported.

The run has one deadline (`--budget-s` from the start): a row is skipped, and recorded with the
reason, when its estimate (the last row of its kind and model, scaled by clients or runs) does
not fit in what is left; a row that runs out of time between rounds is recorded as stopped. The
JSON is rewritten after every row, so a killed run still leaves one.

Usage:
  python benchmarks/gpu.py [--budget-s 450] [--rounds 3] [--quick]
      [--out benchmarks/results/gpu.json]
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
import scaling
import sweep
import workload

import fedjax_lite as fl

RESERVE_S = 5.0  # kept back for the last JSON and tables
PROGRESS = [  # what the line printed after each row shows
  ('seconds', '.1f'),
  ('ex_per_s', ',.0f'),
  ('bound_ex_per_s', ',.0f'),
  ('x_bound', '.2f'),
  ('speedup', '.2f'),
  ('reason', ''),
]


class OutOfBudget(Exception):
  pass


class Budget:
  def __init__(self, seconds: float):
    self.end = time.perf_counter() + seconds

  def left(self) -> float:
    return self.end - time.perf_counter()

  def check(self) -> None:
    if self.left() <= 0:
      raise OutOfBudget('the budget ran out during the row')


def timed_rounds(step, carry, rounds: int, budget: Budget, row: dict, prefix: str = ''):
  """1 warm-up call then `rounds` timed calls of `carry = step(carry)`; fills `row` as it goes."""
  seconds = []
  for r in range(rounds + 1):
    budget.check()
    carry, elapsed = harness.timed(lambda c=carry: step(c))
    if r:
      seconds.append(elapsed)
      row[f'{prefix}round_s'] = statistics.median(seconds)
      row[f'{prefix}timed_rounds'] = len(seconds)
    else:
      row[f'{prefix}warmup_s'] = elapsed
  return carry


class Cohort:
  """One (model, clients) cohort: round 0's clients of a population of `max(1,000, clients)`,
  batched (`fl.data.batch_cohort`) and put on the device."""

  def __init__(self, model_name: str, clients: int):
    self.key = (model_name, clients)
    self.model = workload.build_mlp() if model_name == 'mlp' else workload.build_cnn()
    population = max(workload.POPULATION, clients)
    data = workload.SyntheticEmnist.variant('homo', population)
    if model_name == 'cnn':
      data = data.preprocess_batch(lambda b: workload.as_model_input('cnn', b))
    ids = [int(c) for c in workload.cohort_ids(0, population, clients)]
    self.host, self.make_s = harness.timed(
      lambda: fl.data.batch_cohort(data, ids, batch_size=workload.BATCH_SIZE, round_num=0)
    )
    self.batches, self.put_s = harness.timed(lambda: jax.device_put(self.host))
    self.examples = int(np.sum(self.host.mask))
    self.refs: dict = {}
    self.first_weights = None


def refs_row(row: dict, cohort: Cohort, rounds: int, budget: Budget) -> None:
  trainable = cohort.model.initial_weights.trainable
  clients = workload.real_examples(cohort.host)
  for name, batch_size in (('bound', workload.BATCH_SIZE), ('ceiling', workload.DP_BATCH_SIZE)):
    fn, args = workload.Centralized(cohort.model, batch_size).prepare(trainable, clients, 0)
    row[f'{name}_temp_bytes'] = int(fn.memory_analysis().temp_size_in_bytes)
    step = lambda w, fn=fn, args=args: fn(w, *args)
    timed_rounds(step, trainable, rounds, budget, row, prefix=f'{name}_')
    row[f'{name}_ex_per_s'] = cohort.refs[name] = cohort.examples / row[f'{name}_round_s']
  row['ceiling_x_bound'] = row['ceiling_ex_per_s'] / row['bound_ex_per_s']


def fedavg_row(row: dict, cohort: Cohort, rounds: int, budget: Budget) -> None:
  process = fl.algorithms.build_weighted_fed_avg(
    cohort.model,
    fl.optimizers.build_sgdm(workload.CLIENT_LR),
    fl.optimizers.build_sgdm(workload.SERVER_LR),
    client_chunk_size=row['chunk'],
  )
  row['chunk_used'] = min(row['chunk'], row['clients'])
  row['temp_bytes'], row['compile_s'] = harness.timed(
    lambda: harness.compiled_temp_bytes(process, cohort.batches)
  )
  step = lambda s: process.next(s, cohort.batches).state
  state = timed_rounds(step, process.initialize(), rounds, budget, row)
  row['compilations'] = process.next._cache_size()
  row['ex_per_s'] = cohort.examples / row['round_s']
  for name in ('bound', 'ceiling'):
    if name in cohort.refs:
      row[f'x_{name}'] = row['ex_per_s'] / cohort.refs[name]
  weights = process.get_model_weights(state).trainable
  if cohort.first_weights is None:
    cohort.first_weights = weights
  else:  # every chunk size ran the same rounds on the same cohort from the same start
    row['max_abs_diff_vs_first_chunk'] = workload.max_abs_diff(weights, cohort.first_weights)


def sweep_process(seed: int) -> fl.LearningProcess:
  """The fedavg rows' MLP process (`workload.build_mlp`, chunk the backend's default), its
  initial weights and keys from `seed`."""
  model = fl.models.mlp_classifier(
    workload.NUM_FEATURES, workload.NUM_CLASSES, hidden=(200, 200), seed=seed
  )
  assert workload.num_params(model) == workload.MLP_PARAMS
  return fl.algorithms.build_weighted_fed_avg(
    model,
    fl.optimizers.build_sgdm(workload.CLIENT_LR),
    fl.optimizers.build_sgdm(workload.SERVER_LR),
    seed=seed,
  )


def sweep_row(row: dict, cohort: Cohort, rounds: int) -> None:
  cohorts = [cohort.batches] * (rounds + 1)  # every round on the one cohort, as fedavg rows
  # no budget checks inside
  row.update(sweep.measure(row['runs'], cohorts, process_fn=sweep_process))
  row['temp_KB_per_run'] = row['temp_bytes_per_run'] / 1024
  row['temp_KB_one_run'] = row['temp_bytes_one_run'] / 1024


def plan(args) -> list[dict]:
  """The rows in order: the small cases of the MLP, the sweep and the CNN, then the largest."""

  def group(model_name, clients):
    rows = [{'kind': 'refs', 'model': model_name, 'clients': clients}]
    seen = {}
    for k in args.chunk_sizes:
      same = seen.setdefault(min(k, clients), k)
      rows.append({'kind': 'fedavg', 'model': model_name, 'clients': clients, 'chunk': k})
      if same != k:
        rows[-1]['skip'] = f'chunk {k} >= {clients} clients: the same program as chunk {same}'
    return rows

  mlp, cnn, runs = sorted(args.mlp_clients), sorted(args.cnn_clients), sorted(args.runs)
  sweeps = lambda ks: [
    {'kind': 'sweep', 'model': 'mlp', 'cohort_clients': args.sweep_clients, 'runs': k} for k in ks
  ]
  rows = [r for n in mlp[:-1] for r in group('mlp', n)] + sweeps(runs[:-1])
  rows += [r for n in cnn[:-1] for r in group('cnn', n)]
  rows += group('mlp', mlp[-1]) if mlp else []
  rows += sweeps(runs[-1:])
  rows += group('cnn', cnn[-1]) if cnn else []
  return rows


def size(row: dict) -> int:
  return row.get('clients') or row['runs']


def estimate(row: dict, done: list[dict]) -> float | None:
  """Seconds for `row` from the last finished row of its kind and model (of its chunk size when
  one ran), its rounds and data scaled by clients or runs, its compilation not; None when none
  ran (then only the smallest row of its kind and model runs)."""
  same = [
    r
    for r in done
    if (r['kind'], r['model']) == (row['kind'], row['model']) and r['status'] == 'done'
  ]
  same = [r for r in same if r.get('chunk') == row.get('chunk')] or same
  if not same:
    return None
  last = same[-1]
  return last['fixed_s'] + (last['seconds'] - last['fixed_s']) * size(row) / size(last)


def fixed_seconds(row: dict, rounds: int) -> float:
  """The part of a finished row that does not grow with its size: `next`'s compilation (fedavg),
  all but the rounds (sweep); none for refs (their pooling grows with the cohort)."""
  if row['kind'] == 'fedavg':
    return row['compile_s']
  if row['kind'] == 'sweep':
    per_round = row['sweep_round_s'] + row['sequential_round_s']
    return max(0.0, row['seconds'] - (rounds + 1) * per_round)
  return 0.0


def name(row: dict) -> str:
  if row['kind'] == 'sweep':
    return f'sweep K={row["runs"]}'
  chunk = f' chunk {row["chunk"]}' if 'chunk' in row else ''
  return f'{row["model"]} {row["clients"]:,} {row["kind"]}{chunk}'


def run(args, results: dict) -> None:
  budget = Budget(args.budget_s)
  rows = plan(args)
  smallest = {}
  for row in rows:
    key = (row['kind'], row['model'])
    smallest[key] = min(smallest.get(key, size(row)), size(row))
  results['rows'] = done = []
  cohort = None
  for row in rows:
    row['name'] = name(row)
    left = budget.left() - RESERVE_S
    guess = estimate(row, done)
    if 'skip' in row:
      row.update(status='skipped', reason=row.pop('skip'))
    elif left <= 0:
      row.update(status='skipped', reason=f'budget spent (the last {RESERVE_S:.0f} s are kept)')
    elif guess is None and size(row) != smallest[(row['kind'], row['model'])]:
      row.update(status='skipped', reason='no smaller row of its kind and model ran to estimate it')
    elif guess is not None and guess > left:
      row.update(status='skipped', reason=f'estimated {guess:.0f} s > {left:.0f} s left')
    else:
      row['estimate_s'] = guess
      start = time.perf_counter()
      try:
        clients = row.get('clients') or row['cohort_clients']
        if cohort is None or cohort.key != (row['model'], clients):
          cohort = None  # free the previous cohort first
          cohort = Cohort(row['model'], clients)
          row.update(cohort_make_s=cohort.make_s, cohort_put_s=cohort.put_s)
        row['examples'] = cohort.examples
        if row['kind'] == 'sweep':
          sweep_row(row, cohort, args.rounds)
        else:
          measure = refs_row if row['kind'] == 'refs' else fedavg_row
          measure(row, cohort, args.rounds, budget)
        row['status'] = 'done'
      except OutOfBudget as e:
        row.update(status='stopped', reason=str(e))
      except Exception as e:  # e.g. out of device memory: record it, go on with the next row
        row.update(status='error', reason=f'{type(e).__name__}: {e}'[:2000])
      row['seconds'] = time.perf_counter() - start
      if row['status'] == 'done':
        row['fixed_s'] = fixed_seconds(row, args.rounds)
      stats = jax.devices()[0].memory_stats() or {}  # None on a CPU
      row['device_peak_bytes_so_far'] = stats.get('peak_bytes_in_use')
    done.append(row)
    figures = [f'{key} {format(row[key], spec)}' for key, spec in PROGRESS if key in row]
    print(f'[{budget.left():4.0f} s left] {row["name"]}: {row["status"]}; {", ".join(figures)}')
    results['meta']['total_run_s'] = args.budget_s - budget.left()
    harness.write_json(args.out, results)


REFS_COLUMNS = [
  ('model', ''),
  ('clients', ','),
  ('bound_ex_per_s', ',.0f'),
  ('ceiling_ex_per_s', ',.0f'),
  ('ceiling_x_bound', '.2f'),
  ('bound_temp_MB', ',.1f'),
  ('ceiling_temp_MB', ',.1f'),
  ('seconds', '.1f'),
]
FEDAVG_COLUMNS = [
  ('model', ''),
  ('clients', ','),
  ('chunk', ','),
  ('round_s', '.4f'),
  ('ex_per_s', ',.0f'),
  ('x_bound', '.2f'),
  ('x_ceiling', '.2f'),
  ('temp_MB', ',.1f'),
  ('compile_s', '.1f'),
  ('seconds', '.1f'),
]
OTHER_COLUMNS = [('name', ''), ('status', ''), ('reason', '')]


def print_tables(rows: Sequence[dict]) -> None:
  for row in rows:
    for key in ('temp_bytes', 'bound_temp_bytes', 'ceiling_temp_bytes'):
      if key in row:
        row[key.replace('bytes', 'MB')] = row[key] / 2**20
  done = [r for r in rows if r['status'] == 'done']
  for title, kind, columns in [
    ('references (pooled examples, one lax.scan)', 'refs', REFS_COLUMNS),
    ('FedAvg round (device-resident cohort)', 'fedavg', FEDAVG_COLUMNS),
    (
      'sweep vs sequential (WORKLOAD MLP, one cohort; benchmarks/sweep.py measure)',
      'sweep',
      [*sweep.COLUMNS, ('seconds', '.1f')],
    ),
  ]:
    chosen = [r for r in done if r['kind'] == kind]
    if chosen:
      print(f'\n{title}\n{harness.format_table(columns, chosen)}')
  others = [r for r in rows if r['status'] != 'done']
  if others:
    print(f'\nnot done\n{harness.format_table(OTHER_COLUMNS, others)}')


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--budget-s', type=float, default=450.0, help='deadline for all rows')
  parser.add_argument(
    '--rounds', type=int, default=3, help='timed rounds per row (after 1 warm-up)'
  )
  parser.add_argument('--mlp-clients', type=int, nargs='*', default=[100, 1000, 10000])
  parser.add_argument('--cnn-clients', type=int, nargs='*', default=[100, 1000, 10000])
  parser.add_argument('--chunk-sizes', type=int, nargs='+', default=[64, 256, 1024])
  parser.add_argument('--runs', type=int, nargs='*', default=[1, 16, 64, 256], help='sweep K')
  parser.add_argument(
    '--sweep-clients', type=int, default=workload.COHORT, help="the sweep rows' MLP cohort"
  )
  parser.add_argument('--quick', action='store_true', help='a CPU smoke run: small rows')
  parser.add_argument('--out', default='benchmarks/results/gpu.json')
  args = parser.parse_args(argv)
  if args.quick:
    args.mlp_clients, args.cnn_clients, args.chunk_sizes = [10, 100], [10], [8, 64]
    args.runs, args.rounds = [1, 4], 1
  sizes = (*args.mlp_clients, *args.cnn_clients, *args.chunk_sizes, *args.runs, args.sweep_clients)
  if args.rounds < 1 or args.budget_s <= 0 or min(sizes, default=1) < 1:
    print(
      'error: --rounds, --budget-s, clients, chunk sizes and runs must be >= 1', file=sys.stderr
    )
    return 2
  meta = harness.environment(argv)
  meta['devices'] = [str(d) for d in jax.devices()]
  meta['budget_s'] = args.budget_s
  print(
    f'jax {meta["jax_version"]}, backend {meta["backend"]}, {meta["device_kind"]} '
    f'x {meta["device_count"]}; budget {args.budget_s:.0f} s, '
    f'1 warm-up + {args.rounds} timed rounds a row'
  )
  results = {
    'meta': meta,
    'workload': {
      'source': 'benchmarks/WORKLOAD.md, homo variant (sweeps too: its MLP)',
      'sweep': (
        f'sweep.measure on the MLP round at {args.sweep_clients} clients (one cohort), '
        'client learning rates 0.03/0.1/0.3 and seeds by run, runs_per_lane the backend default; '
        'design target >= 8x sequential at K = 64 on an H100'
      ),
      'steps_per_client': scaling.STEPS,
      'batch_size': workload.BATCH_SIZE,
      'ceiling_batch_size': workload.DP_BATCH_SIZE,
      'cohort': "round 0's ids, made once per (model, clients), on the device before timing",
      'warmup_rounds': 1,
      'timed_rounds': args.rounds,
      'metric': 'client-examples per second, median over the timed rounds',
    },
  }
  run(args, results)
  print_tables(results['rows'])
  harness.write_json(args.out, results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
