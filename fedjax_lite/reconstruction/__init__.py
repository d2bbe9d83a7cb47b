"""Federated Reconstruction: models whose weights are partly global, partly local to each client.

`ReconstructionModel` partitions a `FunctionalModel`'s weights (`split`/`merge`); dataset split
functions cut each client's batches into a reconstruction and a post-reconstruction part;
`build_fed_recon` trains, `build_fed_recon_eval` evaluates (Singhal et al., NeurIPS 2021).
"""

from fedjax_lite.reconstruction._client_work import build_reconstruction_client_work
from fedjax_lite.reconstruction._dataset_split import (
  DatasetSplitFn,
  build_dataset_split_fn,
  simple_dataset_split_fn,
)
from fedjax_lite.reconstruction._fed_recon import build_fed_recon
from fedjax_lite.reconstruction._fed_recon_eval import build_fed_recon_eval
from fedjax_lite.reconstruction._model import (
  ReconstructionModel,
  from_flax,
  merge,
  resolve_partition,
  split,
)
from fedjax_lite.reconstruction._variable_model import from_variable_model

__all__ = [
  'DatasetSplitFn',
  'ReconstructionModel',
  'build_dataset_split_fn',
  'build_fed_recon',
  'build_fed_recon_eval',
  'build_reconstruction_client_work',
  'from_flax',
  'from_variable_model',
  'merge',
  'resolve_partition',
  'simple_dataset_split_fn',
  'split',
]
