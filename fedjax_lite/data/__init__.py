"""Federated data: `ClientBatches`, a cohort batcher, partitioners and offline datasets."""

from fedjax_lite.data._cifar100 import cifar100_preprocess, load_cifar100
from fedjax_lite.data._client_batches import (
  ClientBatches,
  build_client_batches,
  check_client_batches,
  client_batches_spec,
  client_steps,
)
from fedjax_lite.data._cohort_batching import (
  batch_cohort,
  check_labels,
  client_key,
  padding_fraction,
  step_buckets,
)
from fedjax_lite.data._digits import load_digits, train_test_split
from fedjax_lite.data._federated_data import FederatedData, InMemoryFederatedData
from fedjax_lite.data._federated_datasets import load_emnist, load_shakespeare, load_stackoverflow
from fedjax_lite.data._idx import read_idx
from fedjax_lite.data._image_datasets import load_fashion_mnist, load_mnist, load_mnist_5k
from fedjax_lite.data._leaf import load_leaf
from fedjax_lite.data._movielens import load_movielens_100k, movielens_federated, movielens_split
from fedjax_lite.data._partition import (
  dirichlet_label_partition,
  iid_partition,
  label_shards_partition,
  natural_partition,
  power_law_partition,
)
from fedjax_lite.data._prefetch import Prefetcher
from fedjax_lite.data._registry import DATASETS, DatasetInfo, get_dataset
from fedjax_lite.data._sampling import min_separation_groups, sample_cohort
from fedjax_lite.data._shakespeare import (
  SHAKESPEARE_TFF_TOKENS,
  SHAKESPEARE_VOCAB_SIZE,
  shakespeare_preprocess,
  shakespeare_tff_preprocess,
)
from fedjax_lite.data._sqlite import SQLiteFederatedData
from fedjax_lite.data._stackoverflow import (
  SpecialTokens,
  load_stackoverflow_tag_counts,
  load_stackoverflow_word_counts,
  stackoverflow_tag_preprocess,
  stackoverflow_word_preprocess,
  stackoverflow_word_tokens,
)
from fedjax_lite.data._stragglers import apply_straggler_work, straggler_work
from fedjax_lite.data._synthetic import synthetic_fedprox
from fedjax_lite.data._tff_h5 import HDF5FederatedData, load_tff_h5

__all__ = [
  'DATASETS',
  'SHAKESPEARE_TFF_TOKENS',
  'SHAKESPEARE_VOCAB_SIZE',
  'ClientBatches',
  'DatasetInfo',
  'FederatedData',
  'HDF5FederatedData',
  'InMemoryFederatedData',
  'Prefetcher',
  'SQLiteFederatedData',
  'SpecialTokens',
  'apply_straggler_work',
  'batch_cohort',
  'build_client_batches',
  'check_client_batches',
  'check_labels',
  'cifar100_preprocess',
  'client_batches_spec',
  'client_key',
  'client_steps',
  'dirichlet_label_partition',
  'get_dataset',
  'iid_partition',
  'label_shards_partition',
  'load_cifar100',
  'load_digits',
  'load_emnist',
  'load_fashion_mnist',
  'load_leaf',
  'load_mnist',
  'load_mnist_5k',
  'load_movielens_100k',
  'load_shakespeare',
  'load_stackoverflow',
  'load_stackoverflow_tag_counts',
  'load_stackoverflow_word_counts',
  'load_tff_h5',
  'min_separation_groups',
  'movielens_federated',
  'movielens_split',
  'natural_partition',
  'padding_fraction',
  'power_law_partition',
  'read_idx',
  'sample_cohort',
  'shakespeare_preprocess',
  'shakespeare_tff_preprocess',
  'stackoverflow_tag_preprocess',
  'stackoverflow_word_preprocess',
  'stackoverflow_word_tokens',
  'step_buckets',
  'straggler_work',
  'synthetic_fedprox',
  'train_test_split',
]
