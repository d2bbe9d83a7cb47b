"""The client axis sharded over devices (8 forced CPU devices): same round, same result."""

import jax
import numpy as np
import numpy_reference as ref
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import fedjax_lite as fl


@pytest.mark.skipif(jax.device_count() < 8, reason='needs 8 devices (tests/conftest.py)')
def test_sharded_client_axis_matches_single_device():
  model = ref.linear_model(5, 3)
  clients = ref.random_clients([3, 9, 4, 12, 7, 1, 5, 8])
  batches = fl.data.build_client_batches(clients, batch_size=4, num_epochs=2)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), client_chunk_size=1
  )
  state = process.initialize()
  expected_state, expected_metrics = process.next(state, batches)

  mesh = Mesh(np.array(jax.devices()[:8]), ('clients',))
  sharded = jax.device_put(batches, NamedSharding(mesh, PartitionSpec('clients')))
  assert len(sharded.mask.sharding.device_set) == 8
  got_state, got_metrics = process.next(state, sharded)
  for got, want in zip(jax.tree.leaves(got_state), jax.tree.leaves(expected_state), strict=True):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  train = got_metrics['client_work']['train']
  assert int(train['num_examples']) == int(expected_metrics['client_work']['train']['num_examples'])
