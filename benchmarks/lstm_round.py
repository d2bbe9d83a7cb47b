"""A recurrent model inside the compiled round: TFF's Shakespeare character LSTM (embedding 8,
two LSTM layers of 256, a dense layer over the vocabulary; sequences of 80; batch 4) trained by
FedAvg, against Python loops over the same clients.

Recurrent gradients inside nested loops are where XLA:CPU can fall off its fast paths (the CNN's
convolution gradient ran ~46x slower inside the client loop until it was rewritten), so this
measures before trusting. Rows, on the same cohorts, interleaved round by round:

  fedjax_lite, chunk K: `build_weighted_fed_avg(..., client_chunk_size=K)`, one compiled round;
  (b) Python loop: one jitted `lax.scan` over each client's own steps, summed on the device;
  (e) Python loop: one jitted SGD step per batch (FedJAX's loop).

Data: generated stand-ins with the real shapes (ids in the 90-symbol vocabulary of
`fl.data.shakespeare_preprocess`, 8 sequences a client: 2 steps of batch 4, one epoch).

  python benchmarks/lstm_round.py [--clients 10 100] [--chunk-sizes 1 4] [--rounds 3]
      [--out benchmarks/results/lstm_round.json]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
from workload import CLIENT_LR, SERVER_LR, PythonLoopFedAvg, PythonStepLoopFedAvg

import fedjax_lite as fl

SEQUENCE, BATCH, SEQUENCES_PER_CLIENT = 80, 4, 8
VOCAB = fl.data.SHAKESPEARE_VOCAB_SIZE


class CharLSTM(nn.Module):
  """TFF's Shakespeare model (`tff.simulation.baselines.shakespeare`): embedding 8, LSTM 256 x2."""

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(VOCAB, 8)(x)
    h = nn.RNN(nn.OptimizedLSTMCell(256))(h)
    h = nn.RNN(nn.OptimizedLSTMCell(256))(h)
    return nn.Dense(VOCAB)(h)


def token_cross_entropy(logits, labels, sample_weight=None):
  """Mean cross-entropy over each sequence's non-pad tokens (id 0), then over sequences."""
  per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  real = (labels != 0).astype(logits.dtype)
  per_sequence = jnp.sum(per_token * real, axis=1) / jnp.maximum(jnp.sum(real, axis=1), 1)
  return fl.models.weighted_mean(per_sequence, sample_weight)


def build_model() -> fl.FunctionalModel:
  spec = {
    'x': jax.ShapeDtypeStruct((None, SEQUENCE), jnp.int32),
    'y': jax.ShapeDtypeStruct((None, SEQUENCE), jnp.int32),
  }
  return fl.models.from_flax(CharLSTM(), input_spec=spec, loss_fn=token_cross_entropy)


def cohort_batches(num_clients: int, round_num: int) -> fl.ClientBatches:
  rng = np.random.default_rng([7, round_num])
  clients = []
  for _ in range(num_clients):
    stream = rng.integers(1, VOCAB, (SEQUENCES_PER_CLIENT, SEQUENCE + 1), dtype=np.int32)
    clients.append({'x': stream[:, :-1], 'y': stream[:, 1:]})
  return fl.data.build_client_batches(clients, batch_size=BATCH, seed=round_num)


class FedAvgRunner:
  def __init__(self, model, chunk):
    self.process = fl.algorithms.build_weighted_fed_avg(
      model,
      fl.optimizers.build_sgdm(CLIENT_LR),
      fl.optimizers.build_sgdm(SERVER_LR),
      client_chunk_size=chunk,
    )
    self.carry = self.process.initialize()

  def round(self, batches):
    self.carry, _ = self.process.next(self.carry, batches)
    jax.block_until_ready(self.carry)

  def weights(self):
    return self.process.get_model_weights(self.carry).trainable


class LoopRunner:
  def __init__(self, loop, initial):
    self.loop, self.carry = loop, initial

  def round(self, batches):
    self.carry = jax.block_until_ready(self.loop.round(self.carry, batches))

  def weights(self):
    return self.carry


def run(num_clients: int, chunk_sizes, rounds: int, log=print) -> dict:
  model = build_model()
  initial = model.initial_weights.trainable
  runners = {f'chunk {k}': FedAvgRunner(model, min(k, num_clients)) for k in chunk_sizes}
  runners['(b) loop of per-client scans'] = LoopRunner(PythonLoopFedAvg(model), initial)
  runners['(e) loop of per-batch steps'] = LoopRunner(PythonStepLoopFedAvg(model), initial)
  seconds = {name: [] for name in runners}
  first_round = {}
  for r in range(rounds + 1):  # round 0 compiles
    batches = cohort_batches(num_clients, r)
    for name, runner in runners.items():
      start = time.perf_counter()
      runner.round(batches)
      elapsed = time.perf_counter() - start
      if r == 0:
        first_round[name] = elapsed
      else:
        seconds[name].append(elapsed)
    if r == 0:  # every method trained the same round from the same weights
      reference = runners['(b) loop of per-client scans'].weights()
      for name, runner in runners.items():
        diff = max(
          float(jnp.max(jnp.abs(a - b)))
          for a, b in zip(
            jax.tree.leaves(runner.weights()), jax.tree.leaves(reference), strict=True
          )
        )
        if diff > 1e-3:
          raise AssertionError(f'{name} differs from the loop by {diff:.3g} after round 0')
    log(f'  {num_clients} clients, round {r}: ' + '  '.join(
      f'{n}={(first_round[n] if r == 0 else seconds[n][-1]):.3f}s' for n in runners
    ))  # fmt: skip
  median = {name: statistics.median(s) for name, s in seconds.items()}
  loop = median['(b) loop of per-client scans']
  return {
    'clients': num_clients,
    'median_round_s': median,
    'first_round_s': first_round,
    'x_loop': {name: loop / s for name, s in median.items()},
  }


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--clients', type=int, nargs='+', default=[10, 100])
  parser.add_argument('--chunk-sizes', type=int, nargs='+', default=[1, 4])
  parser.add_argument('--rounds', type=int, default=3, help='timed rounds after one compiling')
  parser.add_argument('--out', default='benchmarks/results/lstm_round.json')
  args = parser.parse_args(argv)
  results = {'meta': harness.environment(argv), 'rows': []}
  for num_clients in args.clients:
    row = run(num_clients, args.chunk_sizes, args.rounds)
    results['rows'].append(row)
    print(f'\n{num_clients} clients a round: median round seconds, x the loop of per-client scans')
    for name, seconds in row['median_round_s'].items():
      print(f'  {name:<32} {seconds:8.3f} s  {row["x_loop"][name]:5.2f}x')
  if args.out:
    harness.write_json(args.out, results)
  return 0


if __name__ == '__main__':
  sys.exit(main())
