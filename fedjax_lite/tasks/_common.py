"""Pieces the baseline tasks share: TFF's file origins, model metrics, stand-in helpers."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.models import _model, _recurrent

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


# What the sequence tasks' loss masks, and where that comes from (their `sources` entry).
LOSS_MASK_SOURCE = (
  "Keras Embedding(mask_zero=True) in TFF's model: the loss averages over the positions whose "
  'input is not pad, so the one EOS -> pad position per sequence counts; the metrics mask by '
  "label (keras_metrics.py). Training and evaluation run that loss (the task's forward pass); "
  '`model.loss`, which sees no inputs, masks by label'
)


def input_masked_forward_pass(model: _model.FunctionalModel, pad: int):
  """A `forward_pass_fn` for a sequence model: `model`'s predictions and TFF's loss over the
  positions whose input is not `pad` (`_recurrent.input_masked_token_cross_entropy`, as Keras's
  `mask_zero` embedding masks them), padded examples (`mask` 0) left out."""
  loss_fn = _recurrent.input_masked_token_cross_entropy(pad)

  def forward_pass(weights, batch, training=True, mask=None):
    x, y = _model.split_batch(batch)
    predictions = model.predict_on_batch(weights, x, training)
    mask = jnp.ones((y.shape[0],), jnp.float32) if mask is None else mask
    loss = loss_fn(predictions, x, y, mask)
    return _model.BatchOutput(predictions, loss, jnp.sum(mask > 0).astype(jnp.int32))

  return forward_pass


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
