"""FedAvg on scikit-learn's digits, split non-IID over 30 clients (Dirichlet alpha=0.5)."""

import numpy as np

import fedjax_lite as fl

# Data: 1,797 8×8 digits, 80% split over clients with label skew, 20% held out.
x, y = fl.data.load_digits()
(x_train, y_train), (x_test, y_test) = fl.data.train_test_split(x, y, seed=0)
parts = fl.data.dirichlet_label_partition(y_train, num_clients=30, alpha=0.5, seed=0)
clients = [{'x': x_train[p], 'y': y_train[p]} for p in parts]

# Model and algorithm: a 64-64-10 MLP, local SGD 0.1, server SGD 1.0 (weighted averaging).
model = fl.models.mlp_classifier(num_features=64, num_classes=10)
process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
evaluation = fl.algorithms.build_fed_eval(model)

num_steps = -(-max(map(len, parts)) * 2 // 16)  # 2 epochs of batch 16: one shape, one compile
state = process.initialize()
for round_num in range(1, 31):
  cohort = np.random.default_rng([0, round_num]).choice(len(clients), 10, replace=False)
  batches = fl.data.build_client_batches(
    [clients[i] for i in cohort], batch_size=16, num_epochs=2, num_steps=num_steps,
    seed=(0, round_num),
  )  # fmt: skip
  state, metrics = process.next(state, batches)
  train = metrics['client_work']['train']
  print(f'round {round_num:2d}  loss {train["loss"]:.4f}  accuracy {train["accuracy"]:.4f}')

test = fl.data.build_client_batches([{'x': x_test, 'y': y_test}], batch_size=len(y_test))
eval_state = evaluation.set_model_weights(evaluation.initialize(), process.get_model_weights(state))
_, eval_metrics = evaluation.next(eval_state, test)
print(
  f'test accuracy {eval_metrics["client_work"]["eval"]["current_round_metrics"]["accuracy"]:.4f}'
)
