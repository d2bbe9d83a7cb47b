"""The shape of the FedProx paper's Figure 1 (Li et al., 2020): training loss on Synthetic(1, 1)
with 0%, 50% and 90% stragglers, for FedAvg (stragglers dropped), FedProx with μ = 0 (their
partial work kept) and FedProx with μ = 1.

The paper's setting: 30 clients, 10 a round, 20 local epochs of batch 10, SGD 0.01, multinomial
logistic regression; a straggler does x of the 20 epochs, x uniform in 1..19. The training loss
is over every client's training data after each round.

  python examples/fedprox_stragglers.py [--rounds 200] [--out docs/images/fedprox_synthetic_1_1.png]
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np

import fedjax_lite as fl

CLIENTS_PER_ROUND, EPOCHS, BATCH_SIZE, LEARNING_RATE = 10, 20, 10, 0.01
STRAGGLERS = (0.0, 0.5, 0.9)
METHODS = {  # name: (proximal strength μ, straggler policy)
  'FedAvg': (None, 'drop'),
  'FedProx (μ = 0)': (0.0, 'partial'),
  'FedProx (μ = 1)': (1.0, 'partial'),
}


def train(mu, policy, stragglers, rounds, seed=0) -> list[float]:
  """Training loss over all clients' training data, before round 1 and after each round."""
  population, _ = fl.data.synthetic_fedprox(1, 1, seed=seed)
  model = fl.models.mlp_classifier(60, 10, (), seed=seed)  # multinomial logistic regression
  sgd = fl.optimizers.build_sgdm(LEARNING_RATE)
  if mu is None:
    process = fl.algorithms.build_weighted_fed_avg(model, sgd, seed=seed)
  else:
    process = fl.algorithms.build_weighted_fed_prox(model, mu, sgd, seed=seed)
  evaluation = fl.simulation.build_evaluation_fn(process, fl.algorithms.build_fed_eval(model))
  everyone = fl.data.build_client_batches(
    population.get_clients(population.client_ids), batch_size=64, shuffle=False
  )
  longest = fl.data.client_steps(int(population.client_sizes.max()), EPOCHS, BATCH_SIZE)
  buckets = fl.data.step_buckets(longest, 4)
  state = process.initialize()
  losses = [float(evaluation(state, everyone)['loss'])]
  for round_num in range(1, rounds + 1):
    cohort = fl.data.sample_cohort(population.num_clients, CLIENTS_PER_ROUND, round_num, seed)
    batches = fl.data.batch_cohort(
      population,
      [population.client_ids[i] for i in cohort],
      batch_size=BATCH_SIZE,
      num_epochs=EPOCHS,
      round_num=round_num,
      seed=seed,
      buckets=buckets,
    )
    work = fl.data.straggler_work(
      CLIENTS_PER_ROUND, stragglers, EPOCHS, round_num=round_num, seed=seed
    )
    state, _ = process.next(state, fl.data.apply_straggler_work(batches, work, policy))
    losses.append(float(evaluation(state, everyone)['loss']))
  return losses


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--rounds', type=int, default=200)
  parser.add_argument('--out', default='docs/images/fedprox_synthetic_1_1.png')
  parser.add_argument('--json', default=None, help='also write the losses here')
  args = parser.parse_args(argv)
  curves = {}
  for stragglers in STRAGGLERS:
    for name, (mu, policy) in METHODS.items():
      curves[f'{name}, {stragglers:.0%} stragglers'] = losses = train(
        mu, policy, stragglers, args.rounds
      )
      print(f'{stragglers:4.0%} stragglers  {name:<16} training loss {losses[-1]:.4f} '
            f'(min {min(losses):.4f}) after {args.rounds} rounds', flush=True)  # fmt: skip
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'rounds': args.rounds, 'training_loss': curves}, f, indent=1)
  import matplotlib

  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, len(STRAGGLERS), figsize=(12, 3.4), sharey=True)
  for ax, stragglers in zip(axes, STRAGGLERS, strict=True):
    for name in METHODS:
      ax.plot(curves[f'{name}, {stragglers:.0%} stragglers'], label=name)
    ax.set_title(f'Synthetic(1, 1), {stragglers:.0%} stragglers')
    ax.set_xlabel('round')
  axes[0].set_ylabel('training loss')
  axes[0].legend()
  top = np.percentile([v for c in curves.values() for v in c], 98)
  axes[0].set_ylim(0, top)
  fig.tight_layout()
  fig.savefig(args.out, dpi=110)
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
