"""Federated data: `ClientBatches`, a cohort batcher, partitioners and offline datasets."""

from fedjax_lite.data._client_batches import (
  ClientBatches,
  build_client_batches,
  check_client_batches,
  client_batches_spec,
)
from fedjax_lite.data._digits import load_digits, train_test_split
from fedjax_lite.data._partition import dirichlet_label_partition

__all__ = [
  'ClientBatches',
  'build_client_batches',
  'check_client_batches',
  'client_batches_spec',
  'dirichlet_label_partition',
  'load_digits',
  'train_test_split',
]
