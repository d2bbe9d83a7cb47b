"""`HDF5FederatedData`: a population in TensorFlow Federated's HDF5 layout, read lazily.

TFF's `HDF5ClientData` files (EMNIST, Shakespeare, Stack Overflow before TFF moved to SQLite)
hold one group per client, `examples/<client_id>/<feature>`, each feature a dataset with a
leading example axis. Client sizes come from the datasets' shapes (metadata only); a client's
arrays are read when it is asked for. h5py is an optional dependency (`pip install
'fedjax_lite[hdf5]'`) imported only here.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence

import numpy as np

from fedjax_lite.data import _federated_data

_EXAMPLES = 'examples'


def _import_h5py():
  try:
    import h5py
  except ImportError as e:
    raise ImportError(
      "reading TFF's HDF5 files needs h5py. Tip: pip install 'fedjax_lite[hdf5]' (or h5py)"
    ) from e
  return h5py


class HDF5FederatedData(_federated_data.FederatedData):
  """Clients stored as `examples/<client_id>/<feature>` in an HDF5 file (TFF's layout).

  Client ids are the group names, sorted (as TFF orders them). Every client must have the
  features of the first one, with the same per-example shape and dtype; this is checked when a
  client is read. Text features come back as object arrays of `bytes`, as h5py stores them.

  Args:
    path: the `.h5` file.
    preprocess: per-client hooks, as for every `FederatedData`.
  """

  def __init__(
    self,
    path: str | pathlib.Path,
    preprocess: Sequence[
      Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]
    ] = (),
  ):
    super().__init__(preprocess)
    h5py = _import_h5py()
    self._path = pathlib.Path(path)
    if not self._path.is_file():
      raise FileNotFoundError(f'path {str(self._path)!r} is not a file; expected a TFF .h5 file')
    try:
      self._file = h5py.File(self._path, 'r')
    except OSError as e:
      raise ValueError(f'{self._path} is not a readable HDF5 file ({e})') from e
    examples = self._file.get(_EXAMPLES)
    if not isinstance(examples, h5py.Group) or not len(examples):
      raise ValueError(
        f"{self._path} has no non-empty group '{_EXAMPLES}'; expected TFF's layout "
        f'examples/<client_id>/<feature> (top-level keys: {sorted(self._file)})'
      )
    self._examples = examples
    self._ids = sorted(examples)
    first = examples[self._ids[0]]
    self._spec = {name: (ds.shape[1:], ds.dtype) for name, ds in first.items()}
    self._sizes: np.ndarray | None = None

  @property
  def path(self) -> pathlib.Path:
    return self._path

  @property
  def client_ids(self) -> list[str]:
    return self._ids

  @property
  def client_sizes(self) -> np.ndarray:
    """`[num_clients]` int64 from the first feature's shape of each client (no data read)."""
    if self._sizes is None:
      feature = min(self._spec)
      self._sizes = np.array(
        [self._examples[c][feature].shape[0] for c in self._ids], dtype=np.int64
      )
    return self._sizes

  def _read(self, client_id: str) -> _federated_data.ClientDataset:
    group = self._examples[client_id]
    spec = {name: (ds.shape[1:], ds.dtype) for name, ds in group.items()}
    if spec != self._spec:
      raise ValueError(
        f'{self._path}: client {client_id!r} has features {_describe(spec)}; expected '
        f'{_describe(self._spec)} like client {self._ids[0]!r}'
      )
    return _federated_data.check_client_dataset(
      client_id, {name: ds[()] for name, ds in group.items()}
    )

  def close(self) -> None:
    """Closes the file; the population cannot be read afterwards."""
    self._file.close()


def _describe(spec: dict) -> str:
  return ', '.join(f'{k}: {dtype}{list(shape)}' for k, (shape, dtype) in sorted(spec.items()))


def load_tff_h5(path: str | pathlib.Path) -> HDF5FederatedData:
  """A lazily read population from a TFF HDF5 file, e.g. `fed_emnist_digitsonly_train.h5`."""
  return HDF5FederatedData(path)
