"""One process of the two-process test runs (tests/simulation/test_multihost.py).

`multihost_worker.py OUT`: three FedAvg rounds of a linear model on clients of uneven sizes, each
process batching its block of every cohort; every process saves the final weights it holds to
`OUT/p<rank>.npz`.

`multihost_worker.py --hold OUT`: writes its pid to `OUT/pid<rank>`, then runs one collective
after another until it is stopped (a process that never ends by itself).

`multihost_worker.py --compiles OUT ARGS...`: runs `fedjax-lite train --distributed ARGS` and
writes to `OUT/compiles<rank>.json` how many times JAX compiled the round and evaluation, and how
many client state files (`SQLiteClientStateStore`) the process opened.
"""

import json
import logging
import os
import sys
import time

import jax
import numpy as np

import fedjax_lite as fl
from fedjax_lite import cli
from fedjax_lite.simulation import multihost

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy_reference as ref

SIZES = [3, 7, 5, 0, 9, 4, 6]  # 7 clients: a block is padded with a client without data


def train(mesh=None):
  """The final weights of the run; one process when `mesh` is None."""
  model = ref.linear_model(5, 3)
  clients = ref.random_clients(SIZES)
  data = fl.data.InMemoryFederatedData(dict(enumerate(clients)))
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.3), mesh=mesh)
  state = process.initialize()
  for round_num in range(1, 4):
    ids = list(range(len(SIZES)))[round_num - 1 :] + list(range(round_num - 1))
    steps = [fl.data.client_steps(n, 1, 2) for n in SIZES]
    buckets = [max(steps)]
    if mesh is None:
      batches = fl.data.batch_cohort(data, ids, batch_size=2, round_num=round_num, buckets=buckets)
    else:
      start, stop, padded = multihost.cohort_block(len(ids), mesh)
      local = fl.data.batch_cohort(
        data, ids[start:stop], batch_size=2, round_num=round_num, buckets=buckets
      )
      batches = multihost.global_batches(multihost.pad_block(local, stop - start), padded, mesh)
    state, _ = process.next(state, batches)
  trainable = multihost.to_host(process.get_model_weights(state).trainable)
  return [trainable['w'], trainable['b']]


def hold(out):
  """Collectives until stopped, once `OUT/pid<rank>` holds this process's pid."""
  path = os.path.join(out, f'pid{jax.process_index()}')
  with open(path + '.tmp', 'w') as f:
    f.write(str(os.getpid()))
  os.replace(path + '.tmp', path)  # whole when it appears
  while True:
    multihost.broadcast_from_primary(np.int32(0))
    time.sleep(0.05)


def count_compiles(out, argv):
  """`fedjax-lite train --distributed ARGV`; writes `OUT/compiles<rank>.json`: the compilations
  JAX logged of a `next` whose arguments include client data on the clients axis (the round),
  and of the other `next`s (evaluation's), and the client state files opened."""
  messages = []

  class Record(logging.Handler):
    def emit(self, record):
      messages.append(record.getMessage())

  jax.config.update('jax_log_compiles', True)
  logging.getLogger('jax').addHandler(Record())
  opened = []
  open_store = fl.simulation.SQLiteClientStateStore.__init__

  def counted_open(self, path, default):
    opened.append(path)
    open_store(self, path, default)

  fl.simulation.SQLiteClientStateStore.__init__ = counted_open
  status = cli.main(['train', *argv, '--distributed'])  # joins the run (multihost.initialize)
  nexts = [m for m in messages if m.startswith('Compiling jit(next_fn) ')]
  rounds = sum(f"spec=P('{multihost.CLIENTS_AXIS}',)" in m for m in nexts)
  counts = {'round': rounds, 'evaluation': len(nexts) - rounds, 'client_state_files': len(opened)}
  with open(os.path.join(out, f'compiles{jax.process_index()}.json'), 'w') as f:
    json.dump(counts, f)
  sys.exit(status)


if __name__ == '__main__':
  if sys.argv[1] == '--compiles':
    count_compiles(sys.argv[2], sys.argv[3:])
  multihost.initialize()
  if sys.argv[1] == '--hold':
    hold(sys.argv[2])
  weights = train(multihost.global_mesh())
  np.savez(os.path.join(sys.argv[1], f'p{jax.process_index()}.npz'), *weights)
