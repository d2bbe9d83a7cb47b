"""The `fedjax-lite` command.

`fedjax-lite train` with no arguments trains FedAvg on the digits data split non-IID over
clients and prints per-round metrics and the final test accuracy.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence

import numpy as np

from fedjax_lite import algorithms, data, models, optimizers


def _train(args: argparse.Namespace) -> int:
  x, y = data.load_digits()
  (x_train, y_train), (x_test, y_test) = data.train_test_split(x, y, seed=args.seed)
  parts = data.dirichlet_label_partition(y_train, args.num_clients, args.alpha, seed=args.seed)
  clients = [{'x': x_train[p], 'y': y_train[p]} for p in parts]
  model = models.mlp_classifier(x.shape[1], 10, seed=args.seed)
  process = algorithms.build_weighted_fed_avg(
    model,
    client_optimizer=optimizers.build_sgdm(args.client_lr),
    server_optimizer=optimizers.build_sgdm(args.server_lr),
  )
  evaluation = algorithms.build_fed_eval(model)
  max_client_steps = -(-max(len(p) for p in parts) * args.epochs // args.batch_size)
  test_batches = data.build_client_batches(
    [{'x': x_test, 'y': y_test}], batch_size=len(y_test), shuffle=False
  )
  state = process.initialize()
  start = time.perf_counter()
  for round_num in range(1, args.rounds + 1):
    cohort = np.random.default_rng([args.seed, round_num]).choice(
      len(clients), args.clients_per_round, replace=False
    )
    batches = data.build_client_batches(
      [clients[i] for i in cohort],
      batch_size=args.batch_size,
      num_epochs=args.epochs,
      num_steps=max_client_steps,  # one shape for every round: compiled once
      seed=(args.seed, round_num),
    )
    state, round_metrics = process.next(state, batches)
    train = round_metrics['client_work']['train']
    print(
      f'round {round_num:3d}  loss {float(train["loss"]):.4f}  '
      f'accuracy {float(train["accuracy"]):.4f}  examples {int(train["num_examples"])}'
    )
  eval_state = evaluation.set_model_weights(
    evaluation.initialize(), process.get_model_weights(state)
  )
  _, eval_metrics = evaluation.next(eval_state, test_batches)
  test = eval_metrics['client_work']['eval']['current_round_metrics']
  print(
    f'test loss {float(test["loss"]):.4f}  test accuracy {float(test["accuracy"]):.4f}  '
    f'({time.perf_counter() - start:.1f}s)'
  )
  return 0


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'expected an int >= 1; got {text}')
  return value


def _positive_float(text: str) -> float:
  value = float(text)
  if not value > 0:
    raise argparse.ArgumentTypeError(f'expected a number > 0; got {text}')
  return value


def build_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(prog='fedjax-lite', description=__doc__.splitlines()[0])
  commands = parser.add_subparsers(dest='command', required=True)
  train = commands.add_parser('train', help='train FedAvg on the digits data (the default job)')
  train.add_argument('--rounds', type=_positive_int, default=30)
  train.add_argument('--num-clients', type=_positive_int, default=30)
  train.add_argument('--clients-per-round', type=_positive_int, default=10)
  train.add_argument('--alpha', type=_positive_float, default=0.5, help='Dirichlet label skew')
  train.add_argument('--batch-size', type=_positive_int, default=16)
  train.add_argument('--epochs', type=_positive_int, default=2)
  train.add_argument('--client-lr', type=_positive_float, default=0.1)
  train.add_argument('--server-lr', type=_positive_float, default=1.0)
  train.add_argument('--seed', type=int, default=0)
  return parser


def main(argv: Sequence[str] | None = None) -> int:
  args = build_parser().parse_args(argv)
  if args.clients_per_round > args.num_clients:
    print(
      f'error: --clients-per-round ({args.clients_per_round}) exceeds --num-clients '
      f'({args.num_clients})',
      file=sys.stderr,
    )
    return 2
  return _train(args)


if __name__ == '__main__':
  sys.exit(main())
