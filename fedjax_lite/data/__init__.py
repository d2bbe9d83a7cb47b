"""Federated data: `ClientBatches`, a cohort batcher, partitioners and offline datasets."""

from fedjax_lite.data._client_batches import (
  ClientBatches,
  build_client_batches,
  check_client_batches,
  client_batches_spec,
)
from fedjax_lite.data._digits import load_digits, train_test_split
from fedjax_lite.data._federated_data import FederatedData, InMemoryFederatedData
from fedjax_lite.data._partition import (
  dirichlet_label_partition,
  iid_partition,
  label_shards_partition,
  natural_partition,
  power_law_partition,
)
from fedjax_lite.data._sampling import sample_cohort

__all__ = [
  'ClientBatches',
  'FederatedData',
  'InMemoryFederatedData',
  'build_client_batches',
  'check_client_batches',
  'client_batches_spec',
  'dirichlet_label_partition',
  'iid_partition',
  'label_shards_partition',
  'load_digits',
  'natural_partition',
  'power_law_partition',
  'sample_cohort',
  'train_test_split',
]
