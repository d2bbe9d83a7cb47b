"""FedAvg round throughput on the reference workload (benchmarks/WORKLOAD.md).

Times one FedAvg round five ways on the same cohorts and the same examples, and reports
client-examples per second (median over the timed rounds):

  (a) fedjax_lite: `fl.algorithms.build_weighted_fed_avg(..., client_chunk_size=K)`, one compiled
      `next` per round, every round padded to the same number of steps (compiled once); K fixed,
      or `'auto'`, the default, measured in its (untimed) first round;
  (b) a Python loop over the clients calling one jitted per-client update (a `lax.scan` over that
      client's own batches), summing example-weighted models on the device;
  (c) the centralized bound: the round's examples pooled, ceil(total / 16) SGD steps of batch 16
      on one model in one jitted `lax.scan` (host preparation and compilation not timed);
  (d) the data-parallel ceiling: the same examples in batches of 1,600 in one `lax.scan`;
  (e) a Python loop over the clients and their batches calling one jitted SGD step (one
      dispatch per batch: what a researcher writes first, and FedJAX's `fed_avg` loop).

The workload (population, models, the baselines (b)-(e)) is `benchmarks/workload.py`; the run's
environment and the JSON output are `benchmarks/harness.py`. Here: a runner per federated
method ((a) per chunk size, (b), (e)), all timed by one loop.

A round of (a), (b) and (e) is timed from "here are the sampled client ids" to "new global weights
ready" (`block_until_ready`), host batching (`fl.data.build_client_batches`) included. The
clients' datasets are made before the clock starts: they stand for data already in memory.
Methods are interleaved round by round (every method runs round r before any runs r + 1), in an
order rotated every round, so that they share the noise of a busy machine and none always runs
after the same neighbour.

After the first round the script checks that (a), for every chunk size, (b) and (e) produce the
same global weights (within 1e-4): all are fed the same `build_client_batches` output.

Every table is timed in each of `--conditions`: `quiet` (the machine as it is) and `contended`
(a neighbour process streams a 256 MiB buffer on one core meanwhile, as another tenant of a
shared host thrashes its L3). Every run of every variant measures `'auto'` afresh (its own layout
cache), so the rows show what a run's first round chooses, not one lucky choice reused.

Usage:
  python benchmarks/fedavg_throughput.py [--quick] [--variants homo hetero]
      [--chunk-sizes auto 1 2 4 8 16] [--conditions quiet contended] [--cnn]
      [--out benchmarks/results/fedavg_throughput.json]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import harness
import jax
from workload import (
  BATCH_SIZE,
  CHECK_TOL,
  CLIENT_LR,
  CNN_PARAMS,
  COHORT,
  DP_BATCH_SIZE,
  HETERO_RANGE,
  HOMO_SIZE,
  IMAGE_SHAPE,
  MLP_PARAMS,
  NOISE_SCALE,
  NUM_CLASSES,
  POPULATION,
  SERVER_LR,
  Centralized,
  PythonLoopFedAvg,
  PythonStepLoopFedAvg,
  SyntheticEmnist,
  as_model_input,
  build_cnn,
  build_mlp,
  cohort_ids,
  max_abs_diff,
)

import fedjax_lite as fl

# ------------------------------------------------------------------------------------------------
# The federated methods (a), (b), (e): one interface, timed by one loop
#
# `initial`: the carry before round 0; `round(carry, host_batches) -> (carry, phases)`, the new
# global weights ready on return, `phases` the method's own timed parts (`put_s`, `next_s`);
# `weights(carry)`: the global trainable weights (the round-0 check); `compiled`: the jitted
# function whose compilations are counted during the timed rounds, or None.


class LoopRunner:
  """(b) or (e): a Python loop over the cohort; the carry is the global trainable weights."""

  def __init__(self, loop: PythonLoopFedAvg | PythonStepLoopFedAvg, initial, compiled=None):
    self.loop = loop
    self.initial = initial
    self.compiled = compiled

  def round(self, trainable, batches: fl.ClientBatches):
    return jax.block_until_ready(self.loop.round(trainable, batches)), {}

  def weights(self, trainable):
    return trainable


class FedAvgRunner:
  """(a): `build_weighted_fed_avg` at one chunk size, or `'auto'` (measured in its first round:
  `chosen` and `tuning_s` say what and how long); the carry is its server state."""

  def __init__(self, model: fl.FunctionalModel, chunk_size: int | str):
    self.process = fl.algorithms.build_weighted_fed_avg(
      model,
      fl.optimizers.build_sgdm(CLIENT_LR),
      fl.optimizers.build_sgdm(SERVER_LR),
      client_chunk_size=chunk_size,
    )
    self.initial = self.process.initialize()
    self.compiled = self.process.next
    self.chosen, self.tuning_s = (None, None) if chunk_size == 'auto' else (chunk_size, 0.0)

  def round(self, state, batches: fl.ClientBatches):
    t0 = time.perf_counter()
    batches = jax.block_until_ready(jax.device_put(batches))
    t1 = time.perf_counter()
    if self.chosen is None:  # untimed: the first round is a warm-up
      self.chosen = self.process.next.tune(state, batches)
      self.tuning_s = time.perf_counter() - t1
      t1 = time.perf_counter()
    state, _ = self.process.next(state, batches)
    jax.block_until_ready(self.process.get_model_weights(state))
    t2 = time.perf_counter()
    return state, {'put_s': t1 - t0, 'next_s': t2 - t1}

  def weights(self, state):
    return self.process.get_model_weights(state).trainable


# ------------------------------------------------------------------------------------------------
# Timing


def run_variant(
  variant: str,
  model_name: str,
  chunk_sizes: Sequence[int],
  methods: Sequence[str],
  warmup: int,
  timed: int,
  cohort_size: int = COHORT,
  log=print,
):
  """Runs the interleaved rounds of one variant and model; returns per-method round records."""
  data = SyntheticEmnist.variant(variant)
  model = build_mlp() if model_name == 'mlp' else build_cnn()
  num_steps = -(-int(data.client_sizes.max()) // BATCH_SIZE)  # every round the same shape
  initial = model.initial_weights.trainable

  # (b) first: in round 0 it runs first, as the reference of the others.
  runners = {}
  if 'b' in methods:
    loop = PythonLoopFedAvg(model)
    runners['b'] = LoopRunner(loop, initial, compiled=loop.client_update)
  if 'e' in methods:
    runners['e'] = LoopRunner(PythonStepLoopFedAvg(model), initial)
  if 'a' in methods:
    for k in chunk_sizes:
      runners[f'a{k}'] = FedAvgRunner(model, k)
  carries = {name: runner.initial for name, runner in runners.items()}
  central = {}
  if 'c' in methods:
    central['c'] = Centralized(model, BATCH_SIZE)
  if 'd' in methods:
    central['d'] = Centralized(model, DP_BATCH_SIZE)
  central_weights = {name: initial for name in central}

  records = {f'a{k}': [] for k in chunk_sizes if 'a' in methods}
  records.update({name: [] for name in ('b', 'e', *central) if name in methods})
  counted = {name: runners[name].compiled for name in records if name in runners}
  counted = {name: fn for name, fn in counted.items() if fn is not None}
  checks = {}
  compiles_after_warmup = {}
  for r in range(warmup + timed):
    is_timed = r >= warmup
    ids = cohort_ids(r)[:cohort_size]
    datasets = {int(c): as_model_input(model_name, data.get_client(int(c))) for c in ids}
    examples = int(sum(len(d['y']) for d in datasets.values()))
    seed = (0, r)
    if r == warmup:
      compiles_after_warmup = {name: fn._cache_size() for name, fn in counted.items()}

    # Round 0 runs (b) first, as the reference of the check; later rounds rotate the order, so
    # that no method always runs right after the same other one.
    order = list(runners)
    order = order[r % len(order) :] + order[: r % len(order)]
    for name in order:
      runner = runners[name]
      t0 = time.perf_counter()
      clients = [datasets[int(c)] for c in ids]
      batches = fl.data.build_client_batches(
        clients, batch_size=BATCH_SIZE, num_steps=num_steps, seed=seed
      )
      t1 = time.perf_counter()
      carries[name], phases = runner.round(carries[name], batches)
      t2 = time.perf_counter()
      if r == 0 and 'b' in runners:
        if name == 'b':
          round0_loop = runner.weights(carries[name])
        else:
          diff = max_abs_diff(runner.weights(carries[name]), round0_loop)
          checks[f'{name}_vs_b_round0_max_abs_diff'] = diff
          if not diff <= CHECK_TOL:
            raise AssertionError(
              f'{variant}/{model_name}: after round 0, {label(name)} and the Python loop (b) '
              f'differ by {diff:.3g} > {CHECK_TOL}'
            )
      if is_timed:
        records[name].append(
          {'round': r, 'examples': examples, 'batch_s': t1 - t0, **phases, 'total_s': t2 - t0}
        )

    for name, runner in central.items():
      clients = [datasets[int(c)] for c in ids]
      fn, args = runner.prepare(central_weights[name], clients, r)
      t0 = time.perf_counter()
      new_weights = jax.block_until_ready(fn(central_weights[name], *args))
      t1 = time.perf_counter()
      central_weights[name] = new_weights
      if is_timed:
        records[name].append(
          {'round': r, 'examples': examples, 'steps': int(args[0].shape[0]), 'total_s': t1 - t0}
        )

    line = ' '.join(
      f'{name}={recs[-1]["examples"] / recs[-1]["total_s"]:,.0f}'
      for name, recs in records.items()
      if is_timed and recs
    )
    log(
      f'  [{variant}/{model_name}] round {r} {"timed" if is_timed else "warm-up"} '
      f'({examples} ex) {line}'
    )

  recompiles = {
    name: fn._cache_size() - compiles_after_warmup.get(name, 0) for name, fn in counted.items()
  }
  layouts = {
    name: {'chosen': runner.chosen, 'tuning_s': runner.tuning_s}
    for name, runner in runners.items()
    if isinstance(runner, FedAvgRunner)
  }
  return records, checks, recompiles, num_steps, layouts


def summarize(records, layouts=None):
  out = {}
  for name, recs in records.items():
    rates = [rec['examples'] / rec['total_s'] for rec in recs]
    summary = {
      'median_ex_per_s': statistics.median(rates),
      'min_ex_per_s': min(rates),
      'max_ex_per_s': max(rates),
      'median_round_s': statistics.median(rec['total_s'] for rec in recs),
      'median_examples': statistics.median(rec['examples'] for rec in recs),
      'rounds': recs,
    }
    for part in ('batch_s', 'put_s', 'next_s'):
      if recs and part in recs[0]:
        summary[f'median_{part}'] = statistics.median(rec[part] for rec in recs)
    summary.update((layouts or {}).get(name, {}))
    out[name] = summary
  bound = out.get('c', {}).get('median_ex_per_s')
  loop = out.get('b', {}).get('median_ex_per_s')
  step_loop = out.get('e', {}).get('median_ex_per_s')
  for name, summary in out.items():
    is_a = name[0] == 'a'
    summary['x_bound'] = summary['median_ex_per_s'] / bound if bound else None
    summary['x_loop'] = summary['median_ex_per_s'] / loop if loop and is_a else None
    summary['x_step_loop'] = summary['median_ex_per_s'] / step_loop if step_loop and is_a else None
  return out


def median_over_runs(summaries: Sequence[dict]) -> dict:
  """Per method, the median over runs of each per-run median (WORKLOAD.md's metric)."""
  if len(summaries) == 1:
    return summaries[0]
  out = {}
  for name in summaries[0]:
    keys = [
      k
      for k, v in summaries[0][name].items()
      if (k.startswith('median_') or k.startswith('x_')) and v is not None
    ]
    out[name] = {k: statistics.median(s[name][k] for s in summaries) for k in keys}
    if 'chosen' in summaries[0][name]:  # a measured layout: the most frequent choice
      out[name]['chosen'] = statistics.mode(s[name]['chosen'] for s in summaries)
    out[name].setdefault('x_loop', None)
    out[name].setdefault('x_step_loop', None)
    out[name]['runs'] = len(summaries)
  return out


LABELS = {
  'b': '(b) Python loop, jitted per-client update',
  'e': '(e) Python loop, jitted per-batch step',
  'c': '(c) centralized bound, batch 16, lax.scan',
  'd': '(d) data-parallel ceiling, batch 1600',
}


def label(name: str, chosen: int | None = None) -> str:
  if name == 'aauto':
    return f'(a) fedjax_lite, chunk auto (measured: {chosen})'
  if name.startswith('a'):
    return f'(a) fedjax_lite build_weighted_fed_avg, chunk {name[1:]}'
  return LABELS[name]


def _order(name: str) -> tuple:
  chunk = name[1:]
  return ('dcbea'.index(name[0]), -1 if chunk == 'auto' else int(chunk) if name[0] == 'a' else 0)


def print_table(title: str, summary: dict, log=print) -> None:
  log(f'\n{title}')
  header = (
    f'{"implementation":<48} {"ex/s":>9} {"x bound":>8} {"x loop":>7} {"x e":>5} {"round s":>8} '
    f'{"batch s":>8} {"put s":>7} {"next s":>7}'
  )
  log(header)
  log('-' * len(header))
  order = sorted(summary, key=_order)
  for name in order:
    s = summary[name]
    ex = s['median_ex_per_s']

    def fmt(v, width, spec):
      return f'{v:>{width}{spec}}' if v is not None else f'{"-":>{width}}'

    log(
      f'{label(name, s.get("chosen")):<48} {ex:>9,.0f} {fmt(s.get("x_bound"), 8, ".2f")} '
      f'{fmt(s.get("x_loop"), 7, ".2f")} {fmt(s.get("x_step_loop"), 5, ".2f")} '
      f'{s["median_round_s"]:>8.3f} {fmt(s.get("median_batch_s"), 8, ".3f")} '
      f'{fmt(s.get("median_put_s"), 7, ".3f")} {fmt(s.get("median_next_s"), 7, ".3f")}'
    )


# ------------------------------------------------------------------------------------------------


def run_condition(args, warmup: int, timed: int) -> dict:
  """Every variant's tables under the machine's present condition; returns `{variant: ...}`."""
  variants = {}
  for variant in args.variants:
    entry = variants.setdefault(variant, {})
    if not args.skip_mlp:
      runs = []
      for rep in range(args.repeats):
        with tempfile.TemporaryDirectory() as layouts:
          os.environ[LAYOUT_CACHE_ENV] = layouts  # 'auto' measures afresh in every run
          records, checks, recompiles, num_steps, layouts = run_variant(
            variant, 'mlp', args.chunk_sizes, ('a', 'b', 'c', 'd', 'e'), warmup, timed
          )
        summary = summarize(records, layouts)
        runs.append(
          {'checks': checks, 'recompiles_in_timed_rounds': recompiles, 'methods': summary}
        )
        print_table(
          f'MLP, {variant}, run {rep + 1} of {args.repeats} ({timed} timed rounds, medians)',
          summary,
        )
        print(f'  check after round 0, max |a - b| per chunk size: {checks}')
        print(f'  compilations during timed rounds: {recompiles}')
        if 'aauto' in layouts:
          print(
            f'  measured layout: chunk {layouts["aauto"]["chosen"]} in '
            f'{layouts["aauto"]["tuning_s"]:.1f} s (compiling included)'
          )
      combined = median_over_runs([run['methods'] for run in runs])
      entry['mlp'] = {'num_steps': num_steps, 'methods': combined, 'runs': runs}
      if args.repeats > 1:
        print_table(
          f'MLP, {variant}: median over {args.repeats} runs of the per-run medians', combined
        )
    if args.cnn:
      if args.cnn_chunk_size is not None:
        best = args.cnn_chunk_size
      elif jax.default_backend() == 'cpu':
        best = 1  # the builders' CPU default for convolutional models (docs/ARCHITECTURE.md)
      elif 'mlp' in entry:
        fixed = [k for k in args.chunk_sizes if k != 'auto'] or [8]
        best = max(fixed, key=lambda k: entry['mlp']['methods'][f'a{k}']['median_ex_per_s'])
      else:
        best = next((k for k in args.chunk_sizes if k != 'auto'), 8)
      best = min(best, args.cnn_clients)
      records, _, recompiles, num_steps, _ = run_variant(
        variant, 'cnn', [best], ('a', 'c'), 1, 2, cohort_size=args.cnn_clients
      )
      summary = summarize(records)
      entry['cnn'] = {
        'num_steps': num_steps,
        'cohort': args.cnn_clients,
        'chunk_size': best,
        'warmup_rounds': 1,
        'timed_rounds': 2,
        'recompiles_in_timed_rounds': recompiles,
        'methods': summary,
      }
      print_table(
        f'CNN, {variant} (cohort {args.cnn_clients}, chunk {best}, 2 timed rounds)', summary
      )
  return variants


def _chunk(value: str) -> int | str:
  if value == 'auto':
    return value
  if not value.isdigit() or int(value) < 1:
    raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 1; got {value!r}")
  return int(value)


# A cache-heavy neighbour: streams a buffer 8x a 32 MiB L3 on one core, as another tenant of a
# shared host does; bounded (it stops by itself after an hour) and stopped with the condition.
NEIGHBOUR_BYTES = 256 << 20
NEIGHBOUR = """
import os, sys, time
import numpy as np
if hasattr(os, 'sched_setaffinity'):
  os.sched_setaffinity(0, {max(os.sched_getaffinity(0))})
buffer = np.ones(int(sys.argv[1]) // 8)
deadline = time.monotonic() + 3600
while time.monotonic() < deadline:
  buffer += 1.0
"""
LAYOUT_CACHE_ENV = 'FEDJAX_LITE_CACHE_DIR'


@contextlib.contextmanager
def neighbour(active: bool):
  """A cache-heavy process running beside the benchmark while `active`."""
  if not active:
    yield
    return
  process = subprocess.Popen([sys.executable, '-c', NEIGHBOUR, str(NEIGHBOUR_BYTES)])
  try:
    time.sleep(1.0)  # its buffer allocated and streaming
    yield
  finally:
    process.terminate()
    process.wait()


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='1 warm-up and 3 timed rounds')
  parser.add_argument(
    '--variants', nargs='+', choices=('homo', 'hetero'), default=['homo', 'hetero']
  )
  parser.add_argument(
    '--chunk-sizes',
    nargs='+',
    type=_chunk,
    default=['auto', 1, 2, 4, 8, 16],
    help="fixed chunks, and 'auto' (measured in its first round, in each condition)",
  )
  parser.add_argument(
    '--conditions',
    nargs='+',
    choices=('quiet', 'contended'),
    default=['quiet', 'contended'],
    help='contended: a neighbour process streams a buffer larger than L3 meanwhile',
  )
  parser.add_argument(
    '--repeats', type=int, default=1, help='MLP runs per variant; figures are medians over runs'
  )
  parser.add_argument('--cnn', action='store_true', help='also time the EMNIST CNN for (a) and (c)')
  parser.add_argument(
    '--cnn-clients',
    type=int,
    default=COHORT,
    help="clients per CNN round (default the workload's 100; fewer makes CPU runs feasible)",
  )
  parser.add_argument('--skip-mlp', action='store_true', help='only the CNN (with --cnn)')
  parser.add_argument(
    '--cnn-chunk-size',
    type=int,
    default=None,
    help='chunk for the CNN; default 1 on CPU, else the best MLP one',
  )
  parser.add_argument('--out', default='benchmarks/results/fedavg_throughput.json')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)

  if args.repeats < 1:
    print('error: --repeats must be >= 1', file=sys.stderr)
    return 2
  if not 1 <= args.cnn_clients <= COHORT:
    print(f'error: --cnn-clients must be in [1, {COHORT}]', file=sys.stderr)
    return 2
  warmup, timed = (1, 3) if args.quick else (2, 10)
  start = time.perf_counter()
  meta = harness.environment(argv)
  print(
    f'jax {meta["jax_version"]}, backend {meta["backend"]}, device {meta["device_kind"]}, '
    f'{meta["cpu_count"]} CPUs; MLP: {warmup} warm-up + {timed} timed rounds'
    + (f' x {args.repeats} runs' if args.repeats > 1 else '')
    + ('; CNN: 1 warm-up + 2 timed rounds' if args.cnn else '')
  )
  results = {
    'meta': meta,
    'workload': {
      'source': 'benchmarks/WORKLOAD.md',
      'classes': NUM_CLASSES,
      'image_shape': IMAGE_SHAPE,
      'noise_scale': NOISE_SCALE,
      'population': POPULATION,
      'cohort': COHORT,
      'homo_size': HOMO_SIZE,
      'hetero_size_range_inclusive': HETERO_RANGE,
      'batch_size': BATCH_SIZE,
      'data_parallel_batch_size': DP_BATCH_SIZE,
      'local_epochs': 1,
      'client_lr': CLIENT_LR,
      'server_lr': SERVER_LR,
      'mlp_params': MLP_PARAMS,
      'cnn_params': CNN_PARAMS,
      'warmup_rounds': warmup,
      'timed_rounds': timed,
      'chunk_sizes': args.chunk_sizes,
      'repeats': args.repeats,
      'metric': 'client-examples per second, median over timed rounds (then over runs)',
    },
    'conditions': {},
  }

  for condition in args.conditions:
    print(f'\n=== {condition} ===')
    with neighbour(condition == 'contended'):
      results['conditions'][condition] = {'variants': run_condition(args, warmup, timed)}

  elapsed = time.perf_counter() - start
  elapsed = time.perf_counter() - start
  results['meta']['total_run_s'] = elapsed
  print(f'\ntotal run time {elapsed:.1f} s')
  if args.out:
    harness.write_json(args.out, results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
