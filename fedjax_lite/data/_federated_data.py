"""`FederatedData`: a population of clients, each a dict of numpy arrays with a leading example
axis, read one client at a time (FedJAX's `FederatedData`, TFF's `ClientData`)."""

from __future__ import annotations

import abc
import copy
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from fedjax_lite.data import _partition

ClientDataset = dict[str, np.ndarray]


def check_client_dataset(client_id: Any, dataset: Mapping[str, Any]) -> ClientDataset:
  """Arrays of one client: same leading length for every feature; returns numpy arrays."""
  arrays = {k: np.asarray(v) for k, v in dataset.items()}
  if not arrays:
    raise ValueError(f'client {client_id!r} has no features; expected e.g. {{"x": ..., "y": ...}}')
  lengths = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
  if None in lengths.values() or len(set(lengths.values())) != 1:
    raise ValueError(
      f'client {client_id!r} features must share a leading example axis; got lengths {lengths}'
    )
  return arrays


class FederatedData(abc.ABC):
  """A population of clients.

  Subclasses give `client_ids`, `client_sizes` and `_read(client_id)`; this class adds
  validation of ids, per-client and per-batch preprocessing hooks and iteration.
  """

  _batch_preprocess: tuple[Callable[[ClientDataset], ClientDataset], ...] = ()

  def __init__(self, preprocess: Sequence[Callable[[ClientDataset], ClientDataset]] = ()):
    self._preprocess = tuple(preprocess)

  @property
  @abc.abstractmethod
  def client_ids(self) -> Sequence[Any]:
    """Every client id, in a fixed order."""

  @property
  @abc.abstractmethod
  def client_sizes(self) -> np.ndarray:
    """`[num_clients]` int64: examples per client, in `client_ids` order, without reading data."""

  @abc.abstractmethod
  def _read(self, client_id: Any) -> ClientDataset:
    """The raw arrays of a known client."""

  @property
  def num_clients(self) -> int:
    return len(self.client_ids)

  def get_client(self, client_id: Any) -> ClientDataset:
    """The arrays of one client, after the preprocessing hooks."""
    return self.get_clients([client_id])[0]

  def get_clients(self, client_ids: Sequence[Any]) -> list[ClientDataset]:
    """The arrays of several clients, after the preprocessing hooks, in `client_ids`' order."""
    client_ids = list(client_ids)
    for client_id in client_ids:
      if client_id not in self._id_set:
        shown = ', '.join(map(repr, list(self.client_ids)[:5]))
        raise KeyError(
          f'unknown client id {client_id!r}; this population has {self.num_clients} clients '
          f'({shown}{", ..." if self.num_clients > 5 else ""})'
        )
    datasets = []
    for client_id, dataset in zip(client_ids, self._read_many(client_ids), strict=True):
      for fn in self._preprocess:
        dataset = check_client_dataset(client_id, fn(dataset))
      datasets.append(dataset)
    return datasets

  def _read_many(self, client_ids: list) -> list[ClientDataset]:
    """The raw arrays of known clients; stores that read many clients at once override it."""
    return [self._read(c) for c in client_ids]

  def __iter__(self) -> Iterator[tuple[Any, ClientDataset]]:
    for client_id in self.client_ids:
      yield client_id, self.get_client(client_id)

  def __len__(self) -> int:
    return self.num_clients

  def preprocess_client(self, fn: Callable[[ClientDataset], ClientDataset]) -> FederatedData:
    """A view whose clients are passed through `fn` (after any earlier hooks) when read.

    `fn` must keep a shared leading example axis; it may drop or change examples, in which
    case `client_sizes` still reports the stored sizes.
    """
    if not callable(fn):
      raise TypeError(f'fn must be callable; got {type(fn).__name__}')
    view = copy.copy(self)
    view._preprocess = (*self._preprocess, fn)
    return view

  def preprocess_batch(self, fn: Callable[[ClientDataset], ClientDataset]) -> FederatedData:
    """A view whose batches are passed through `fn` (after any earlier hooks) when batched.

    `fl.data.batch_cohort` applies the hooks once to all the real examples of a cohort,
    `{feature: [examples, ...]}`, so `fn` must work row by row (each output row a function of
    its input row, e.g. scaling pixels, one-hot labels, a token lookup); it may add, drop or
    retype features. Padding rows are zeros of the output dtype, masked.
    """
    if not callable(fn):
      raise TypeError(f'fn must be callable; got {type(fn).__name__}')
    view = copy.copy(self)
    view._batch_preprocess = (*self._batch_preprocess, fn)
    return view

  def apply_batch_preprocess(self, examples: ClientDataset) -> ClientDataset:
    """`examples` `{feature: [n, ...]}` through the per-batch hooks; checks rows are kept."""
    n = len(next(iter(examples.values())))
    for fn in self._batch_preprocess:
      examples = check_client_dataset('<batch>', fn(examples))
      got = len(next(iter(examples.values())))
      if got != n:
        raise ValueError(
          f'a preprocess_batch function returned {got} rows for {n}; batch hooks must map '
          'rows one to one (drop examples in preprocess_client instead)'
        )
    return examples

  @property
  def _id_set(self) -> set:
    cached = self.__dict__.get('_ids_cache')
    if cached is None:
      cached = self.__dict__['_ids_cache'] = set(self.client_ids)
    return cached


class InMemoryFederatedData(FederatedData):
  """A population held in memory: a mapping of client id -> {feature: array}.

  Example:
    >>> data = InMemoryFederatedData({'alice': {'x': x_a, 'y': y_a}, 'bob': {'x': x_b, 'y': y_b}})
    >>> data = InMemoryFederatedData.from_arrays({'x': x, 'y': y}, client_ids=user_column)
  """

  def __init__(
    self,
    clients: Mapping[Any, Mapping[str, Any]],
    preprocess: Sequence[Callable[[ClientDataset], ClientDataset]] = (),
  ):
    super().__init__(preprocess)
    if not isinstance(clients, Mapping) or not clients:
      raise ValueError('clients must be a non-empty mapping of client id -> {feature: array}')
    self._clients = {c: check_client_dataset(c, d) for c, d in clients.items()}
    first_id, first = next(iter(self._clients.items()))
    for client_id, dataset in self._clients.items():
      if sorted(dataset) != sorted(first):
        raise ValueError(
          f'client {client_id!r} has features {sorted(dataset)}; expected {sorted(first)} '
          f'like client {first_id!r}'
        )
      for k, a in dataset.items():
        if a.shape[1:] != first[k].shape[1:] or a.dtype != first[k].dtype:
          raise ValueError(
            f"client {client_id!r} feature '{k}' is {a.dtype}{list(a.shape[1:])} per example; "
            f'expected {first[k].dtype}{list(first[k].shape[1:])} like client {first_id!r}'
          )
    self._ids = list(self._clients)
    self._sizes = np.array([len(next(iter(d.values()))) for d in self._clients.values()])

  @classmethod
  def from_arrays(
    cls, arrays: Mapping[str, Any], client_ids: Sequence[Any] | np.ndarray
  ) -> InMemoryFederatedData:
    """Groups flat arrays `[n, ...]` by a client-id column `[n]` (first-seen order of ids)."""
    arrays = {k: np.asarray(v) for k, v in arrays.items()}
    client_ids = np.asarray(client_ids)
    n = len(client_ids)
    for k, a in arrays.items():
      if a.ndim == 0 or a.shape[0] != n:
        raise ValueError(f"arrays['{k}'] has shape {a.shape}; expected ({n}, ...) like client_ids")
    groups = {
      client: {k: a[rows] for k, a in arrays.items()}
      for client, rows in _partition.natural_partition(client_ids).items()
    }
    return cls(groups)

  @property
  def client_ids(self) -> list:
    return self._ids

  @property
  def client_sizes(self) -> np.ndarray:
    return self._sizes

  def _read(self, client_id):
    return dict(self._clients[client_id])
