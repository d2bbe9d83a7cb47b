"""The default dataset: scikit-learn's bundled copy of the UCI handwritten digits, read offline.

1,797 images of 8×8 pixels (values 0–16) in 10 classes. The file ships inside the scikit-learn
package (BSD-3; the data is from the UCI repository, CC BY 4.0); it is read as a file, so
scikit-learn is located but never imported.
"""

from __future__ import annotations

import gzip
import pathlib

import numpy as np

from fedjax_lite.data import _package_files


def digits_path() -> pathlib.Path:
  """The path of `digits.csv.gz` inside the installed scikit-learn package."""
  return _package_files.package_file(
    'sklearn', 'datasets/data/digits.csv.gz', 'pip install scikit-learn'
  )


def load_digits(path: str | pathlib.Path | None = None) -> tuple[np.ndarray, np.ndarray]:
  """`(x [1797, 64] float32 in [0, 1], y [1797] int32)`.

  Args:
    path: a `digits.csv.gz` (64 pixel columns then the label per row); default scikit-learn's.
  """
  path = pathlib.Path(path) if path is not None else digits_path()
  if not path.is_file():
    raise FileNotFoundError(f'path {str(path)!r} is not a file; expected digits.csv.gz')
  with gzip.open(path, 'rt') as f:
    table = np.loadtxt(f, delimiter=',', dtype=np.float32)
  if table.ndim != 2 or table.shape[1] != 65:
    raise ValueError(f'{path} holds a table of shape {table.shape}; expected (n, 65)')
  return table[:, :64] / 16.0, table[:, 64].astype(np.int32)


def train_test_split(
  x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
  """A seeded random split into `((x_train, y_train), (x_test, y_test))`."""
  if not 0.0 < test_fraction < 1.0:
    raise ValueError(f'test_fraction must be in (0, 1); got {test_fraction}')
  order = np.random.default_rng(seed).permutation(len(y))
  n_test = round(len(y) * test_fraction)
  test, train = order[:n_test], order[n_test:]
  return (x[train], y[train]), (x[test], y[test])
