"""The main job of `fedjax-lite train`, written out: FedAvg on scikit-learn's digits, split
non-IID over 30 clients (Dirichlet alpha=0.5), 10 clients a round for 30 rounds.

Same data, model, seeds and batching as the command, so it prints the same numbers:
`python examples/fedavg_digits.py` and `fedjax-lite train` both end at the same test accuracy.
"""

import sys

import fedjax_lite as fl


def main(rounds: int = 30, seed: int = 0) -> float:
  # Data: 1,797 8×8 digits; 80% split over 30 clients with label skew, 20% held out.
  x, y = fl.data.load_digits()
  (x_train, y_train), (x_test, y_test) = fl.data.train_test_split(x, y, seed=0)
  parts = fl.data.dirichlet_label_partition(y_train, num_clients=30, alpha=0.5, seed=seed)
  train = fl.data.InMemoryFederatedData(
    {i: {'x': x_train[p], 'y': y_train[p]} for i, p in enumerate(parts)}
  )

  # Model and algorithm: a 64-200-200-10 MLP; local SGD at 0.1, server SGD at 1.0 (averaging).
  model = fl.models.mlp_classifier(64, 10, hidden=(200, 200), seed=seed)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), seed=seed
  )
  evaluation = fl.algorithms.build_fed_eval(model)
  test = fl.data.build_client_batches([{'x': x_test, 'y': y_test}], batch_size=256, shuffle=False)

  # 2 local epochs of batch 16; step counts bucketed so the round compiles at most 4 times.
  longest = fl.data.client_steps(int(train.client_sizes.max()), 2, 16)
  buckets = fl.data.step_buckets(longest, 4)
  state = process.initialize()
  for round_num in range(1, rounds + 1):
    cohort = fl.data.sample_cohort(train.num_clients, 10, round_num, seed=seed)
    batches = fl.data.batch_cohort(
      train,
      [train.client_ids[i] for i in cohort],
      batch_size=16,
      num_epochs=2,
      round_num=round_num,
      seed=seed,
      buckets=buckets,
      num_classes=10,
    )
    state, metrics = process.next(state, batches)
    client_metrics = metrics['client_work']['train']
    print(
      f'round {round_num:4d}  loss {client_metrics["loss"]:.4f}  '
      f'accuracy {client_metrics["accuracy"]:.4f}'
    )

  eval_state = evaluation.set_model_weights(
    evaluation.initialize(), process.get_model_weights(state)
  )
  _, eval_metrics = evaluation.next(eval_state, test)
  accuracy = float(eval_metrics['client_work']['eval']['current_round_metrics']['accuracy'])
  print(f'final: test accuracy {accuracy:.4f}')
  return accuracy


if __name__ == '__main__':
  main(*map(int, sys.argv[1:]))
