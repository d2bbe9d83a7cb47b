"""The hyperparameters of Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR 2021).

Cross-task settings (their Section 5 and Appendix D): one client epoch, clients per round, batch
sizes and total rounds per task. Best learning rates per task and method (their Appendix D
tables of best client and server learning rates and adaptive epsilons, written as log10 values
and republished with the paper's code, google-research/federated `optimization/`), for client
SGD and the server optimizers FedAdagrad, FedAdam, FedYogi, FedAvgM (server SGD with momentum
0.9) and FedAvg (server SGD).
"""

from __future__ import annotations

import types

PAPER = 'Reddi et al. 2021, "Adaptive Federated Optimization" (ICLR), Appendix D'
PAPER_CODE = "google-research/federated optimization/ (the paper's code and hyperparameter tables)"

# task -> (clients per round, batch size, total rounds); client epochs are 1 for every task.
CROSS_TASK = types.MappingProxyType(
  {
    'cifar100': (10, 20, 4000),
    'emnist_character': (10, 20, 1500),
    'shakespeare_character': (10, 4, 1200),
    'stackoverflow_tag': (10, 100, 1500),
    'stackoverflow_word': (50, 16, 1500),
  }
)
CLIENT_EPOCHS = 1

# Server optimizer (catalogue name) -> task -> log10 client learning rate, log10 server learning
# rate, log10 epsilon (None for the non-adaptive methods).
_LOG10 = {
  'adagrad': {
    'cifar100': (-1, -1, -2),
    'emnist_character': (-1.5, -1, -2),
    'shakespeare_character': (0, -0.5, -1),
    'stackoverflow_tag': (2, 1, -2),
    'stackoverflow_word': (-0.5, -1.5, -4),
  },
  'adam': {
    'cifar100': (-1.5, 0, -1),
    'emnist_character': (-1.5, -2.5, -4),
    'shakespeare_character': (0, -2, -3),
    'stackoverflow_tag': (2, -0.5, -5),
    'stackoverflow_word': (-0.5, -2, -5),
  },
  'yogi': {
    'cifar100': (-1.5, 0, -1),
    'emnist_character': (-1.5, -2.5, -4),
    'shakespeare_character': (0, -2, -3),
    'stackoverflow_tag': (2, -0.5, -5),
    'stackoverflow_word': (-0.5, -2, -5),
  },
  'sgdm': {  # FedAvgM
    'cifar100': (-1.5, 0, None),
    'emnist_character': (-1.5, -0.5, None),
    'shakespeare_character': (0, -0.5, None),
    'stackoverflow_tag': (2, 0, None),
    'stackoverflow_word': (-0.5, 0, None),
  },
  'sgd': {  # FedAvg
    'cifar100': (-1, 0.5, None),
    'emnist_character': (-1, 0, None),
    'shakespeare_character': (0, 0, None),
    'stackoverflow_tag': (2, 0, None),
    'stackoverflow_word': (-0.5, 0, None),
  },
}


def tuned(task: str) -> types.MappingProxyType:
  """Server optimizer -> `{'client_lr', 'server_lr'[, 'epsilon']}` of `task` (plain numbers)."""
  table = {}
  for optimizer, rows in _LOG10.items():
    client, server, epsilon = rows[task]
    entry = {'client_lr': 10.0**client, 'server_lr': 10.0**server}
    if epsilon is not None:
      entry['epsilon'] = 10.0**epsilon
    table[optimizer] = types.MappingProxyType(entry)
  return types.MappingProxyType(table)


def defaults(task: str) -> types.MappingProxyType:
  """The `fedjax-lite train` settings of `task`: the paper's cross-task values with its FedAvgM
  learning rates (client SGD, server SGD with momentum 0.9: a method whose every setting the
  command expresses exactly; the adaptive methods' epsilons have no option yet, see `tuned`)."""
  clients, batch, rounds = CROSS_TASK[task]
  rates = tuned(task)['sgdm']
  return types.MappingProxyType(
    {
      'client_optimizer': 'sgd',
      'client_lr': rates['client_lr'],
      'server_optimizer': 'sgdm',
      'server_lr': rates['server_lr'],
      'batch_size': batch,
      'epochs': CLIENT_EPOCHS,
      'clients_per_round': clients,
      'rounds': rounds,
      'max_steps': None,
    }
  )


def sources(task: str) -> dict[str, str]:
  """The `sources` entries every task shares."""
  where = f'{PAPER}; {PAPER_CODE}'
  return {
    'client_optimizer, client_lr, server_optimizer, server_lr': (
      f'{where}: FedAvgM row (client SGD, server momentum 0.9) of the best learning rates; '
      "`tuned` holds every method's row"
    ),
    'batch_size, clients_per_round, rounds': f'{where}: cross-task table, {task}',
    'epochs': f'{where}: one client epoch in every experiment',
    'max_steps': 'none in the paper (local work is E epochs)',
  }
