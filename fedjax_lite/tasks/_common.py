"""Pieces the baseline tasks share: TFF's file origins, model metrics, stand-in helpers."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.models import _model

TFF_BASELINES = 'tensorflow_federated/python/simulation/baselines'
# TFF's HDF5 archives (before TFF moved to SQLite), as its `load_data` functions fetched them.
ORIGIN = 'https://storage.googleapis.com/tff-datasets-public/{}.tar.bz2'


def metric_fns(metrics: Mapping[str, metrics_lib.FunctionalMetric]):
  """The task's metrics plus `num_batches`, which TFF's Keras models report (`loss` and
  `num_examples` the client work adds)."""
  return metrics_lib.create_functional_metric_fns(
    {**metrics, 'num_batches': metrics_lib.num_batches()}
  )


def metric_names(metrics: Mapping[str, object]) -> tuple[str, ...]:
  return ('loss', 'num_examples', 'num_batches', *metrics)


def rebuilt(
  model: _model.FunctionalModel, trainable, loss_fn, metrics_fns, forward_pass_fn=None
) -> _model.FunctionalModel:
  """`model`'s prediction function with other initial trainable weights, loss and metrics."""
  return _model.FunctionalModel(
    initial_weights=_model.ModelWeights(trainable, model.initial_weights.non_trainable),
    predict_on_batch_fn=model.predict_on_batch_fn,
    loss_fn=loss_fn,
    metrics_fns=metrics_fns,
    forward_pass_fn=forward_pass_fn,
    input_spec=model.input_spec,
  )


def spec(x_shape, x_dtype, y_shape, y_dtype) -> dict:
  return {
    'x': jax.ShapeDtypeStruct((None, *x_shape), x_dtype),
    'y': jax.ShapeDtypeStruct((None, *y_shape), y_dtype),
  }


def client_sizes(rng: np.random.Generator, num_clients: int, low: int, high: int) -> list[int]:
  return [int(n) for n in rng.integers(low, high + 1, num_clients)]


def text_array(values) -> np.ndarray:
  """An object array of `bytes`, as h5py returns TFF's text features."""
  out = np.empty(len(values), dtype=object)
  out[:] = [v.encode('utf-8') if isinstance(v, str) else v for v in values]
  return out


INT32 = jnp.int32
FLOAT32 = jnp.float32
