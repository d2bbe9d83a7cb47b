"""Federated CIFAR-100 (TFF's `fed_cifar100_{train,test}.h5`) and TFF's image preprocessing.

TFF's files hold 500 train and 100 test clients of 100 images each (a Pachinko allocation over
the coarse and fine labels), as `examples/<client_id>/{image [n, 32, 32, 3] uint8, label [n],
coarse_label [n]}`.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import numpy as np

from fedjax_lite.data import _federated_data, _federated_datasets, _tff_h5

CIFAR100_SPLITS = ('train', 'test')


def cifar100_file_name(split: str = 'train') -> str:
  """TFF's HDF5 file name of a split: `fed_cifar100_train.h5` or `fed_cifar100_test.h5`."""
  if split not in CIFAR100_SPLITS:
    raise ValueError(f'split must be one of {CIFAR100_SPLITS}; got {split!r}')
  return f'fed_cifar100_{split}.h5'


def load_cifar100(
  path: str | pathlib.Path | None = None, split: str = 'train'
) -> _federated_data.FederatedData:
  """Federated CIFAR-100 from TFF's HDF5 file, read lazily.

  Clients hold `image [n, 32, 32, 3]` uint8, `label [n]` (0..99) and `coarse_label [n]` (0..19);
  turn them into model batches with `cifar100_preprocess`.

  Args:
    path: the `.h5` file, its folder, or None (`$FEDJAX_LITE_DATA_DIR`, then
      `~/.keras/datasets`).
    split: `'train'` or `'test'`.
  """
  _, where = _federated_datasets.find_source(path, cifar100_file_name(split), split, leaf=False)
  return _tff_h5.load_tff_h5(where)


def _standardize(images: np.ndarray) -> np.ndarray:
  """`tf.image.per_image_standardization`: each image to mean 0 and std 1 (the std floored at
  1/sqrt(pixels) so flat images stay finite)."""
  flat = images.reshape(len(images), -1)
  mean = flat.mean(axis=1, keepdims=True)
  std = np.maximum(flat.std(axis=1, keepdims=True), 1.0 / np.sqrt(flat.shape[1]))
  return ((flat - mean) / std).reshape(images.shape).astype(np.float32)


def cifar100_preprocess(
  crop: tuple[int, int] = (24, 24), distort: bool = False, seed: int = 0
) -> Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]:
  """A per-client hook `{'image': [n, 32, 32, 3], 'label': [n]} -> {'x': [n, h, w, 3] float32,
  'y': [n] int32}`, TFF's cifar100 `build_image_map`.

  Each image is cropped to `crop = (h, w)`: centrally (`tf.image.resize_with_crop_or_pad`), or
  with `distort` at a uniformly random place and flipped left-right with probability 1/2 (new
  draws each time a client is read, from a generator seeded by `seed`); then standardized per
  image (`tf.image.per_image_standardization`).
  """
  height, width = crop
  if not (1 <= height <= 32 and 1 <= width <= 32):
    raise ValueError(f'crop must be (height, width) within (32, 32); got {crop!r}')
  rng = np.random.default_rng(seed)

  def preprocess(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
    if 'image' not in dataset or 'label' not in dataset:
      raise KeyError(f"cifar100_preprocess needs 'image' and 'label'; got {sorted(dataset)}")
    images = np.asarray(dataset['image'], np.float32)
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3):
      raise ValueError(f"'image' has shape {images.shape}; expected (n, 32, 32, 3)")
    n = len(images)
    if distort:
      tops = rng.integers(0, 32 - height + 1, n)
      lefts = rng.integers(0, 32 - width + 1, n)
      flips = rng.random(n) < 0.5
      crops = np.zeros((n, height, width, 3), np.float32)
      for i, (top, left) in enumerate(zip(tops, lefts, strict=True)):
        crops[i] = images[i, top : top + height, left : left + width]
      crops[flips] = crops[flips, :, ::-1]
    else:
      top, left = (32 - height) // 2, (32 - width) // 2
      crops = images[:, top : top + height, left : left + width]
    return {'x': _standardize(crops), 'y': np.asarray(dataset['label']).astype(np.int32)}

  return preprocess
