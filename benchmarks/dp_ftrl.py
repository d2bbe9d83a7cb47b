"""Privacy–utility of DP-FTRL's correlated noise against DP-FedAvg at equal ε.

One task, trained for the same rounds with: FedAvg without DP; DP-FedAvg (independent noise,
amplification by fixed-size sampling, `PrivacyAccountant(sampling='fixed_size')`); and DP-FTRL
with tree aggregation, banded MF and BLT on the cyclic min-separation schedule
(`sample_cohort(..., min_separation=b)`, `DPFTRLAccountant`, no amplification). Both analyses
use replace-one neighbours (the clipped sum's sensitivity is 2 x clip per round). For each ε the
noise multiplier of every method is the smallest reaching it (bisection on its accountant). The
table gives test accuracy after the last round, the DP mechanism's state (bytes of its noise
buffers for this model) and the mean round time after compilation.

The population is a generated stand-in: 4,000 clients with 16 examples each of a 10-class
multinomial logistic task on 60 features (a shared linear teacher, Gaussian inputs), a 4,000
example test set, an MLP 60-32-10 (2,282 parameters). 200 clients a round (`--cohort`), 100
rounds, clip 0.5, client SGD 0.1 (2 steps of 8), server SGD 1.0 with momentum 0.9 (DP-FTRL with
momentum) for every method; min separation b = 20 (groups of 200 clients, each client in at
most 5 rounds). Each row is the mean (and sample std) of `--seeds` runs.

Usage:
  python benchmarks/dp_ftrl.py [--epsilons 2 8] [--rounds 100] [--cohort 200] [--seeds 3]
      [--out benchmarks/results/dp_ftrl.json] [--png docs/images/dp_ftrl.png]
"""

from __future__ import annotations

import argparse
import statistics
import time

import harness
import jax
import jax.numpy as jnp
import numpy as np

import fedjax_lite as fl

AGG = fl.aggregators
POPULATION, EXAMPLES, FEATURES, CLASSES = 4000, 16, 60, 10
CLIP, DELTA, SEPARATION = 0.5, 1e-5, 20
METHODS = ('fedavg', 'dp_fedavg', 'tree', 'banded', 'blt')


def population(seed: int = 0):
  """`(clients, test)`: the stand-in task (see the module docstring)."""
  rng = np.random.default_rng(seed)
  teacher = rng.normal(0, 1, (FEATURES, CLASSES)) / np.sqrt(FEATURES) * 3

  def draw(n):
    x = rng.normal(0, 1, (n, FEATURES)).astype(np.float32)
    logits = x @ teacher + rng.gumbel(0, 1, (n, CLASSES))
    return {'x': x, 'y': logits.argmax(1).astype(np.int32)}

  pooled = draw(POPULATION * EXAMPLES)
  clients = [
    {k: v[i * EXAMPLES : (i + 1) * EXAMPLES] for k, v in pooled.items()} for i in range(POPULATION)
  ]
  return clients, draw(4000)


def bisect_noise(epsilon_of, target: float, low: float = 0.05, high: float = 400.0) -> float:
  """The smallest noise multiplier (to 0.2%) whose ε is at most `target`."""
  for _ in range(60):
    mid = (low * high) ** 0.5
    if epsilon_of(mid) > target:
      low = mid
    else:
      high = mid
    if high / low < 1.002:
      break
  return high


def build(method: str, noise: float, rounds: int, cohort: int, model, seed: int):
  if method == 'fedavg':
    aggregator = AGG.UnweightedMeanFactory()
  elif method == 'dp_fedavg':
    aggregator = AGG.DifferentiallyPrivateFactory.gaussian_fixed(noise, cohort, CLIP, seed)
  else:
    aggregator = AGG.dp_ftrl_aggregator(
      noise,
      cohort,
      CLIP,
      mechanism=method,
      total_rounds=rounds,
      min_separation=SEPARATION,
      seed=seed,
    )
  process = fl.algorithms.build_unweighted_fed_avg(
    model,
    fl.optimizers.build_sgdm(0.1),
    fl.optimizers.build_sgdm(1.0, momentum=0.9),
    model_aggregator=aggregator,
    client_chunk_size=cohort,
  )
  return process, aggregator


def state_bytes(aggregator, model) -> int:
  """Bytes of the DP mechanism's noise state for `model`'s updates (0 without one)."""
  if not isinstance(aggregator, AGG.DPFTRLFactory):
    return 0 if isinstance(aggregator, AGG.UnweightedMeanFactory) else 8  # DP-FedAvg: a key
  state = aggregator.create(fl.tree.tree_specs(model.initial_weights.trainable)).initialize()
  return int(sum(x.nbytes for x in jax.tree.leaves(state)))


def train(method, noise, rounds, cohort, clients, test, seed=0):
  model = fl.models.mlp_classifier(FEATURES, CLASSES, hidden=(32,), seed=seed)
  process, aggregator = build(method, noise, rounds, cohort, model, seed)
  separation = 1 if method in ('fedavg', 'dp_fedavg') else SEPARATION
  state = process.initialize()
  times = []
  for r in range(rounds):
    ids = fl.data.sample_cohort(POPULATION, cohort, r, seed, min_separation=separation)
    batches = fl.data.build_client_batches([clients[i] for i in ids], batch_size=8, seed=[seed, r])
    start = time.perf_counter()
    state, _ = process.next(state, batches)
    jax.block_until_ready(state)
    times.append(time.perf_counter() - start)
  weights = process.get_model_weights(state)
  logits = model.predict_on_batch_fn(weights, jnp.asarray(test['x']), False)
  accuracy = float(np.mean(np.asarray(logits).argmax(1) == test['y']))
  return accuracy, state_bytes(aggregator, model), statistics.median(times[1:])


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--epsilons', type=float, nargs='+', default=[2.0, 8.0])
  parser.add_argument('--rounds', type=int, default=100)
  parser.add_argument('--cohort', type=int, default=200, help='clients a round (<= 4000/20)')
  parser.add_argument('--seeds', type=int, default=3, help='runs per row (mean and std)')
  parser.add_argument('--out', default='benchmarks/results/dp_ftrl.json')
  parser.add_argument('--png', default='docs/images/dp_ftrl.png')
  args = parser.parse_args(argv)
  meta = harness.environment(argv)
  clients, test = population()
  rounds = args.rounds
  mechanisms = {}
  for name in ('tree', 'banded', 'blt'):
    start = time.perf_counter()
    mechanisms[name] = AGG.build_dp_ftrl_mechanism(name, rounds, min_separation=SEPARATION)
    seconds, buffers = time.perf_counter() - start, mechanisms[name].buffers
    print(f'{name}: built in {seconds:.1f}s, {buffers} buffers')

  def epsilon_fn(method):
    if method == 'dp_fedavg':
      return lambda z: AGG.PrivacyAccountant(
        z, args.cohort, POPULATION, DELTA, sampling='fixed_size'
      ).epsilon(rounds)
    return lambda z: AGG.DPFTRLAccountant(mechanisms[method], z, DELTA).epsilon(rounds)

  def trained(method, noise):
    """Mean and std of the test accuracy over the seeds, the state bytes, the median round."""
    runs = [train(method, noise, rounds, args.cohort, clients, test, s) for s in range(args.seeds)]
    accuracies = [r[0] for r in runs]
    std = statistics.stdev(accuracies) if len(runs) > 1 else 0.0
    return statistics.mean(accuracies), std, runs[0][1], statistics.median(r[2] for r in runs)

  rows = []
  accuracy, std, memory, seconds = trained('fedavg', 0.0)
  rows.append(
    {'epsilon': 'inf', 'method': 'fedavg', 'noise_multiplier': 0.0, 'test_accuracy': accuracy,
     'accuracy_std': std, 'state_bytes': memory, 'round_ms': 1e3 * seconds}
  )  # fmt: skip
  print(rows[-1])
  for target in args.epsilons:
    for method in METHODS[1:]:
      noise = bisect_noise(epsilon_fn(method), target)
      accuracy, std, memory, seconds = trained(method, noise)
      rows.append(
        {'epsilon': f'{target:g}', 'method': method, 'noise_multiplier': noise,
         'achieved_epsilon': epsilon_fn(method)(noise), 'test_accuracy': accuracy,
         'accuracy_std': std, 'state_bytes': memory, 'round_ms': 1e3 * seconds}
      )  # fmt: skip
      print(rows[-1])
  columns = [
    ('epsilon', ''),
    ('method', ''),
    ('noise_multiplier', '.3f'),
    ('achieved_epsilon', '.3f'),
    ('test_accuracy', '.3f'),
    ('accuracy_std', '.3f'),
    ('state_bytes', 'd'),
    ('round_ms', '.2f'),
  ]
  print(harness.format_table(columns, rows))
  setup = {
    'population': POPULATION,
    'examples_per_client': EXAMPLES,
    'clients_per_round': args.cohort,
    'rounds': rounds,
    'clip': CLIP,
    'delta': DELTA,
    'min_separation': SEPARATION,
    'max_participations': mechanisms['blt'].max_participations,
    'neighboring': 'replace_one',
    'model': 'mlp 60-32-10',
    'server_optimizer': 'sgd 1.0 momentum 0.9',
    'seeds': args.seeds,
    'blt_strategy': [list(map(float, x)) for x in mechanisms['blt'].strategy],
    'banded_coefficients': list(map(float, mechanisms['banded'].strategy)),
  }
  harness.write_json(args.out, {'meta': meta, 'setup': setup, 'rows': rows})
  plot(rows, args.epsilons, args.cohort, args.png)


def plot(rows, epsilons, cohort, path) -> None:
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker

  fig, ax = plt.subplots(figsize=(6, 3.6))
  baseline = next(r['test_accuracy'] for r in rows if r['method'] == 'fedavg')
  for method in METHODS[1:]:
    xs = [e for e in epsilons for r in rows if r['method'] == method and r['epsilon'] == f'{e:g}']
    ys = [r['test_accuracy'] for e in epsilons for r in rows
          if r['method'] == method and r['epsilon'] == f'{e:g}']  # fmt: skip
    ax.plot(xs, ys, marker='o', label=method)
  ax.axhline(baseline, color='gray', linestyle='--', label='FedAvg, no DP')
  ax.set_xscale('log')
  ax.set_xticks(epsilons, [f'{e:g}' for e in epsilons])
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel('ε (δ = 1e-5, replace-one)')
  ax.set_ylabel('test accuracy')
  ax.set_title(f'DP-FTRL vs DP-FedAvg: {POPULATION} clients, {cohort}/round')
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
