"""FedAvg round throughput on the reference workload (benchmarks/WORKLOAD.md).

Times one FedAvg round five ways on the same cohorts and the same examples, and reports
client-examples per second (median over the timed rounds):

  (a) fedjax_lite: `fl.algorithms.build_weighted_fed_avg(..., client_chunk_size=K)`, one compiled
      `next` per round, every round padded to the same number of steps (compiled once);
  (b) a Python loop over the clients calling one jitted per-client update (a `lax.scan` over that
      client's own batches), summing example-weighted models on the device;
  (c) the centralized bound: the round's examples pooled, ceil(total / 16) SGD steps of batch 16
      on one model in one jitted `lax.scan` (host preparation and compilation not timed);
  (d) the data-parallel ceiling: the same examples in batches of 1,600 in one `lax.scan`;
  (e) a Python loop over the clients and their batches calling one jitted SGD step (one
      dispatch per batch: what a researcher writes first, and FedJAX's `fed_avg` loop).

A round of (a), (b) and (e) is timed from "here are the sampled client ids" to "new global weights
ready" (`block_until_ready`), host batching (`fl.data.build_client_batches`) included. The
clients' datasets are made before the clock starts: they stand for data already in memory.
Methods are interleaved round by round (every method runs round r before any runs r + 1) so that
they share the noise of a busy machine.

After the first round the script checks that (a), for every chunk size, (b) and (e) produce the
same global weights (within 1e-4): all are fed the same `build_client_batches` output.

Usage:
  python benchmarks/fedavg_throughput.py [--quick] [--variants homo hetero]
      [--chunk-sizes 4 8 16 32 100] [--cnn] [--out benchmarks/results/fedavg_throughput.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

import fedjax_lite as fl

# The workload (benchmarks/WORKLOAD.md); change nothing here without changing WORKLOAD.md.
NUM_CLASSES = 62
IMAGE_SHAPE = (28, 28, 1)
NUM_FEATURES = 28 * 28
NOISE_SCALE = 0.35
POPULATION = 1000
COHORT = 100
HOMO_SIZE = 64
HETERO_RANGE = (10, 200)  # inclusive
BATCH_SIZE = 16
DP_BATCH_SIZE = 1600  # data-parallel ceiling: 100 x 16
CLIENT_LR = 0.1
SERVER_LR = 1.0
MLP_PARAMS = 209_662
CNN_PARAMS = 1_206_590
CHECK_TOL = 1e-4


# ------------------------------------------------------------------------------------------------
# Data


class SyntheticEmnist:
  """The WORKLOAD.md population, each client's examples made on demand from its own seed.

  Prototypes: `default_rng(0)`, U(0, 1) of shape 28x28x1 for each of 62 classes. Sizes: 64 each
  (`homo`) or `default_rng(0).integers(10, 200, inclusive)` (`hetero`). Client c's labels and
  noise come from `default_rng([0, c])`, so a client's data is the same whenever it is made and
  the population (~330 MB as float32 for `hetero`) never has to be held at once.
  """

  def __init__(self, variant: str):
    if variant not in ('homo', 'hetero'):
      raise ValueError(f"variant must be 'homo' or 'hetero'; got {variant!r}")
    self.variant = variant
    prototypes = np.random.default_rng(0).random((NUM_CLASSES, *IMAGE_SHAPE))
    self.prototypes = prototypes.astype(np.float32).reshape(NUM_CLASSES, NUM_FEATURES)
    if variant == 'homo':
      self.sizes = np.full(POPULATION, HOMO_SIZE, np.int64)
    else:
      low, high = HETERO_RANGE
      self.sizes = np.random.default_rng(0).integers(low, high, size=POPULATION, endpoint=True)

  def client(self, c: int) -> dict[str, np.ndarray]:
    """Client c's examples: x `[n, 784]` float32 in [0, 1], y `[n]` int32."""
    rng = np.random.default_rng([0, int(c)])
    n = int(self.sizes[c])
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    noise = rng.standard_normal((n, NUM_FEATURES), dtype=np.float32)
    x = np.clip(self.prototypes[y] + np.float32(NOISE_SCALE) * noise, 0.0, 1.0)
    return {'x': x, 'y': y}


def cohort_ids(round_num: int) -> np.ndarray:
  return np.random.default_rng(1000 + round_num).choice(POPULATION, COHORT, replace=False)


# ------------------------------------------------------------------------------------------------
# Models


def num_params(model: fl.FunctionalModel) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.initial_weights.trainable))


def build_mlp() -> fl.FunctionalModel:
  model = fl.models.mlp_classifier(NUM_FEATURES, NUM_CLASSES, hidden=(200, 200))
  assert num_params(model) == MLP_PARAMS, num_params(model)
  return model


def build_cnn(seed: int = 0) -> fl.FunctionalModel:
  """The EMNIST CNN: conv3x3x32, conv3x3x64 (VALID, ReLU), maxpool 2x2, dense 128 (ReLU), 62."""
  model = fl.models.cnn_classifier(IMAGE_SHAPE, NUM_CLASSES, seed=seed)
  assert num_params(model) == CNN_PARAMS, num_params(model)
  return model


def as_model_input(model_name: str, client: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if model_name == 'cnn':
    return {'x': client['x'].reshape(-1, *IMAGE_SHAPE), 'y': client['y']}
  return client


# ------------------------------------------------------------------------------------------------
# The simple baselines: plain SGD over `[steps, batch, ...]` batches with a mask


def make_local_sgd(model: fl.FunctionalModel, learning_rate: float):
  """`(trainable, x [steps, b, ...], y [steps, b], mask [steps, b]) -> trainable` via lax.scan."""
  non_trainable = model.initial_weights.non_trainable

  def loss_fn(trainable, x, y, mask):
    logits = model.predict_on_batch(fl.ModelWeights(trainable, non_trainable), x, True)
    return model.loss(logits, y, mask)

  def step(trainable, batch):
    grads = jax.grad(loss_fn)(trainable, *batch)
    return jax.tree.map(lambda w, g: w - learning_rate * g, trainable, grads), None

  def local_sgd(trainable, x, y, mask):
    return lax.scan(step, trainable, (x, y, mask))[0]

  return local_sgd


class PythonLoopFedAvg:
  """(b): a loop over clients; each a jitted scan over its own steps; weighted sum on device."""

  def __init__(self, model: fl.FunctionalModel):
    local_sgd = make_local_sgd(model, CLIENT_LR)

    def client_update(global_trainable, acc, x, y, mask):
      trainable = local_sgd(global_trainable, x, y, mask)
      n = jnp.sum(mask)
      return jax.tree.map(lambda a, w: a + n * w, acc, trainable)

    self.client_update = jax.jit(client_update)
    self.finish = jax.jit(
      lambda acc, total, global_trainable: jax.tree.map(
        lambda a, g: g + SERVER_LR * (a / total - g), acc, global_trainable
      )
    )
    self.zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t))

  def round(self, trainable, client_batches: fl.ClientBatches):
    mask = client_batches.mask
    steps = np.count_nonzero(mask.any(axis=2), axis=1)
    acc = self.zeros(trainable)
    for i, s in enumerate(steps):
      acc = self.client_update(
        trainable,
        acc,
        client_batches.batch['x'][i, :s],
        client_batches.batch['y'][i, :s],
        mask[i, :s],
      )
    return self.finish(acc, float(mask.sum()), trainable)


class PythonStepLoopFedAvg:
  """(e): a loop over clients and over each client's batches calling one jitted SGD step.

  What a researcher writes first (and FedJAX's `fed_avg` does): one dispatch per batch.
  """

  def __init__(self, model: fl.FunctionalModel):
    non_trainable = model.initial_weights.non_trainable

    def step(trainable, x, y):
      def loss_fn(trainable):
        logits = model.predict_on_batch(fl.ModelWeights(trainable, non_trainable), x, True)
        return model.loss(logits, y)

      grads = jax.grad(loss_fn)(trainable)
      return jax.tree.map(lambda w, g: w - CLIENT_LR * g, trainable, grads)

    self.step = jax.jit(step)
    self.accumulate = jax.jit(lambda acc, n, w: jax.tree.map(lambda a, b: a + n * b, acc, w))
    self.finish = jax.jit(
      lambda acc, total, global_trainable: jax.tree.map(
        lambda a, g: g + SERVER_LR * (a / total - g), acc, global_trainable
      )
    )

  def round(self, trainable, client_batches: fl.ClientBatches):
    mask = client_batches.mask
    acc = jax.tree.map(jnp.zeros_like, trainable)
    for i in range(mask.shape[0]):
      local = trainable
      for s in range(mask.shape[1]):
        real = mask[i, s] > 0
        if not real.any():
          break
        local = self.step(
          local, client_batches.batch['x'][i, s][real], client_batches.batch['y'][i, s][real]
        )
      acc = self.accumulate(acc, float(mask[i].sum()), local)
    return self.finish(acc, float(mask.sum()), trainable)


def pooled_batches(clients, batch_size: int, seed: Sequence[int]):
  """The cohort's examples pooled, shuffled, cut into `[steps, batch_size, ...]` with a mask."""
  x = np.concatenate([c['x'] for c in clients])
  y = np.concatenate([c['y'] for c in clients])
  n = len(y)
  order = np.random.default_rng(list(seed)).permutation(n)
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  x = np.concatenate([x[order], np.zeros((pad, *x.shape[1:]), x.dtype)])
  y = np.concatenate([y[order], np.zeros((pad,), y.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = (steps, batch_size)
  return x.reshape(*shape, *x.shape[1:]), y.reshape(shape), mask.reshape(shape)


class Centralized:
  """(c) and (d): one model, one jitted scan over the pooled examples, compiled ahead of time."""

  def __init__(self, model: fl.FunctionalModel, batch_size: int):
    self.batch_size = batch_size
    self.jitted = jax.jit(make_local_sgd(model, CLIENT_LR))
    self.compiled = {}

  def prepare(self, trainable, clients, round_num: int):
    """Untimed: pool, shuffle, pad, put on the device, compile for this shape."""
    x, y, mask = jax.device_put(pooled_batches(clients, self.batch_size, (1, round_num)))
    key = x.shape
    if key not in self.compiled:
      self.compiled[key] = self.jitted.lower(trainable, x, y, mask).compile()
    jax.block_until_ready((x, y, mask))
    return self.compiled[key], (x, y, mask)


# ------------------------------------------------------------------------------------------------
# Timing


def max_abs_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )


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
  data = SyntheticEmnist(variant)
  model = build_mlp() if model_name == 'mlp' else build_cnn()
  num_steps = -(-int(data.sizes.max()) // BATCH_SIZE)  # every round the same shape
  initial = model.initial_weights.trainable

  processes, fl_states = {}, {}
  if 'a' in methods:
    for k in chunk_sizes:
      processes[k] = fl.algorithms.build_weighted_fed_avg(
        model,
        fl.optimizers.build_sgdm(CLIENT_LR),
        fl.optimizers.build_sgdm(SERVER_LR),
        client_chunk_size=k,
      )
      fl_states[k] = processes[k].initialize()
  loop = PythonLoopFedAvg(model) if 'b' in methods else None
  loop_weights = initial
  step_loop = PythonStepLoopFedAvg(model) if 'e' in methods else None
  step_loop_weights = initial
  central = {}
  if 'c' in methods:
    central['c'] = Centralized(model, BATCH_SIZE)
  if 'd' in methods:
    central['d'] = Centralized(model, DP_BATCH_SIZE)
  central_weights = {name: initial for name in central}

  records = {f'a{k}': [] for k in processes}
  records.update({name: [] for name in ('b', 'e', *central) if name in methods})
  checks = {}
  compiles_after_warmup = {}
  for r in range(warmup + timed):
    is_timed = r >= warmup
    ids = cohort_ids(r)[:cohort_size]
    datasets = {int(c): as_model_input(model_name, data.client(c)) for c in ids}
    examples = int(sum(len(d['y']) for d in datasets.values()))
    seed = (0, r)
    if r == warmup:
      compiles_after_warmup = {k: p.next._cache_size() for k, p in processes.items()}
      if loop is not None:
        compiles_after_warmup['b'] = loop.client_update._cache_size()

    if loop is not None:
      t0 = time.perf_counter()
      clients = [datasets[int(c)] for c in ids]
      batches = fl.data.build_client_batches(
        clients, batch_size=BATCH_SIZE, num_steps=num_steps, seed=seed
      )
      t1 = time.perf_counter()
      new_weights = loop.round(loop_weights, batches)
      jax.block_until_ready(new_weights)
      t2 = time.perf_counter()
      if r == 0:
        round0_loop = new_weights
      loop_weights = new_weights
      if is_timed:
        records['b'].append(
          {'round': r, 'examples': examples, 'batch_s': t1 - t0, 'total_s': t2 - t0}
        )

    if step_loop is not None:
      t0 = time.perf_counter()
      clients = [datasets[int(c)] for c in ids]
      batches = fl.data.build_client_batches(
        clients, batch_size=BATCH_SIZE, num_steps=num_steps, seed=seed
      )
      t1 = time.perf_counter()
      new_weights = jax.block_until_ready(step_loop.round(step_loop_weights, batches))
      t2 = time.perf_counter()
      if r == 0 and loop is not None:
        diff = max_abs_diff(new_weights, round0_loop)
        checks['e_vs_b_round0_max_abs_diff'] = diff
        if not diff <= CHECK_TOL:
          raise AssertionError(f'{variant}/{model_name}: (e) and (b) differ by {diff:.3g}')
      step_loop_weights = new_weights
      if is_timed:
        records['e'].append(
          {'round': r, 'examples': examples, 'batch_s': t1 - t0, 'total_s': t2 - t0}
        )

    for k, process in processes.items():
      t0 = time.perf_counter()
      clients = [datasets[int(c)] for c in ids]
      batches = fl.data.build_client_batches(
        clients, batch_size=BATCH_SIZE, num_steps=num_steps, seed=seed
      )
      t1 = time.perf_counter()
      batches = jax.block_until_ready(jax.device_put(batches))
      t2 = time.perf_counter()
      state, _ = process.next(fl_states[k], batches)
      jax.block_until_ready(process.get_model_weights(state))
      t3 = time.perf_counter()
      fl_states[k] = state
      if r == 0 and loop is not None:
        diff = max_abs_diff(process.get_model_weights(state).trainable, round0_loop)
        checks[f'a{k}_vs_b_round0_max_abs_diff'] = diff
        if not diff <= CHECK_TOL:
          raise AssertionError(
            f'{variant}/{model_name}: after round 0, fedjax_lite (chunk {k}) and the Python loop '
            f'differ by {diff:.3g} > {CHECK_TOL}'
          )
      if is_timed:
        records[f'a{k}'].append(
          {
            'round': r,
            'examples': examples,
            'batch_s': t1 - t0,
            'put_s': t2 - t1,
            'next_s': t3 - t2,
            'total_s': t3 - t0,
          }
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

  recompiles = {}
  for k, p in processes.items():
    recompiles[f'a{k}'] = p.next._cache_size() - compiles_after_warmup.get(k, 0)
  if loop is not None:
    recompiles['b'] = loop.client_update._cache_size() - compiles_after_warmup.get('b', 0)
  return records, checks, recompiles, num_steps


def summarize(records):
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


def label(name: str) -> str:
  if name.startswith('a'):
    return f'(a) fedjax_lite build_weighted_fed_avg, chunk {name[1:]}'
  return LABELS[name]


def print_table(title: str, summary: dict, log=print) -> None:
  log(f'\n{title}')
  header = (
    f'{"implementation":<48} {"ex/s":>9} {"x bound":>8} {"x loop":>7} {"x e":>5} {"round s":>8} '
    f'{"batch s":>8} {"put s":>7} {"next s":>7}'
  )
  log(header)
  log('-' * len(header))
  order = sorted(summary, key=lambda n: ('dcbea'.index(n[0]), int(n[1:]) if n[0] == 'a' else 0))
  for name in order:
    s = summary[name]
    ex = s['median_ex_per_s']

    def fmt(v, width, spec):
      return f'{v:>{width}{spec}}' if v is not None else f'{"-":>{width}}'

    log(
      f'{label(name):<48} {ex:>9,.0f} {fmt(s.get("x_bound"), 8, ".2f")} '
      f'{fmt(s.get("x_loop"), 7, ".2f")} {fmt(s.get("x_step_loop"), 5, ".2f")} '
      f'{s["median_round_s"]:>8.3f} {fmt(s.get("median_batch_s"), 8, ".3f")} '
      f'{fmt(s.get("median_put_s"), 7, ".3f")} {fmt(s.get("median_next_s"), 7, ".3f")}'
    )


# ------------------------------------------------------------------------------------------------


def machine_load() -> dict:
  """Load average and (Linux) CPU pressure: how busy the machine was; figures vary with it."""
  load = {'loadavg': list(os.getloadavg()) if hasattr(os, 'getloadavg') else None}
  try:
    with open('/proc/pressure/cpu') as f:
      load['cpu_pressure'] = f.readline().strip()
  except OSError:
    pass
  return load


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--quick', action='store_true', help='1 warm-up and 3 timed rounds')
  parser.add_argument(
    '--variants', nargs='+', choices=('homo', 'hetero'), default=['homo', 'hetero']
  )
  parser.add_argument('--chunk-sizes', nargs='+', type=int, default=[4, 8, 16, 32, 100])
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
    '--cnn-chunk-size', type=int, default=None, help='chunk for the CNN; default the best MLP one'
  )
  parser.add_argument('--out', default='benchmarks/results/fedavg_throughput.json')
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if any(k < 1 for k in args.chunk_sizes):
    print('error: --chunk-sizes must be >= 1', file=sys.stderr)
    return 2
  if args.repeats < 1:
    print('error: --repeats must be >= 1', file=sys.stderr)
    return 2
  if not 1 <= args.cnn_clients <= COHORT:
    print(f'error: --cnn-clients must be in [1, {COHORT}]', file=sys.stderr)
    return 2
  warmup, timed = (1, 3) if args.quick else (2, 10)
  start = time.perf_counter()
  device = jax.devices()[0]
  print(
    f'jax {jax.__version__}, backend {jax.default_backend()}, device {device.device_kind}, '
    f'{os.cpu_count()} CPUs; MLP: {warmup} warm-up + {timed} timed rounds'
    + (f' x {args.repeats} runs' if args.repeats > 1 else '')
    + ('; CNN: 1 warm-up + 2 timed rounds' if args.cnn else '')
  )
  results = {
    'meta': {
      'date': datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds'),
      'jax_version': jax.__version__,
      'jaxlib_version': jaxlib.__version__,
      'numpy_version': np.__version__,
      'fedjax_lite_version': fl.__version__,
      'backend': jax.default_backend(),
      'device_kind': device.device_kind,
      'device_count': jax.device_count(),
      'cpu_count': os.cpu_count(),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'argv': sys.argv[1:] if argv is None else list(argv),
      'load_before': machine_load(),
    },
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
    'variants': {},
  }

  for variant in args.variants:
    entry = results['variants'].setdefault(variant, {})
    if not args.skip_mlp:
      runs = []
      for rep in range(args.repeats):
        records, checks, recompiles, num_steps = run_variant(
          variant, 'mlp', args.chunk_sizes, ('a', 'b', 'c', 'd', 'e'), warmup, timed
        )
        summary = summarize(records)
        runs.append(
          {'checks': checks, 'recompiles_in_timed_rounds': recompiles, 'methods': summary}
        )
        print_table(
          f'MLP, {variant}, run {rep + 1} of {args.repeats} ({timed} timed rounds, medians)',
          summary,
        )
        print(f'  check after round 0, max |a - b| per chunk size: {checks}')
        print(f'  compilations during timed rounds: {recompiles}')
      combined = median_over_runs([run['methods'] for run in runs])
      entry['mlp'] = {'num_steps': num_steps, 'methods': combined, 'runs': runs}
      if args.repeats > 1:
        print_table(
          f'MLP, {variant}: median over {args.repeats} runs of the per-run medians', combined
        )
    if args.cnn:
      if args.cnn_chunk_size is not None:
        best = args.cnn_chunk_size
      elif 'mlp' in entry:
        best = max(
          args.chunk_sizes, key=lambda k: entry['mlp']['methods'][f'a{k}']['median_ex_per_s']
        )
      else:
        best = args.chunk_sizes[0]
      best = min(best, args.cnn_clients)
      records, _, recompiles, num_steps = run_variant(
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

  elapsed = time.perf_counter() - start
  results['meta']['total_run_s'] = elapsed
  results['meta']['load_after'] = machine_load()
  print(f'\ntotal run time {elapsed:.1f} s')
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, 'w') as f:
      json.dump(results, f, indent=1, default=lambda o: list(o) if isinstance(o, tuple) else str(o))
    print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
