"""`tff.learning.optimizers` as optax transformations, hyperparameters in state; `get_hparams` /
`set_hparams`."""

from fedjax_lite.optimizers._optimizers import (
  build_adagrad,
  build_adam,
  build_rmsprop,
  build_sgdm,
  build_yogi,
  get_hparams,
  replace_hparams,
  set_hparams,
)

__all__ = [
  'build_adagrad',
  'build_adam',
  'build_rmsprop',
  'build_sgdm',
  'build_yogi',
  'get_hparams',
  'replace_hparams',
  'set_hparams',
]
