"""The common frame of the ready-made classifiers: softmax cross-entropy and accuracy."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.models import _losses, _model


def classifier(
  trainable: Any, predict_on_batch: Callable, example_shape: Sequence[int]
) -> _model.FunctionalModel:
  """A `FunctionalModel` over `{'x': [batch, *example_shape] float32, 'y': [batch] int32}`
  with masked softmax cross-entropy and an accuracy metric; no non-trainable weights."""
  return _model.FunctionalModel(
    initial_weights=_model.ModelWeights(trainable, ()),
    predict_on_batch_fn=predict_on_batch,
    loss_fn=_losses.softmax_cross_entropy,
    metrics_fns=metrics_lib.create_functional_metric_fns(
      {'accuracy': metrics_lib.sparse_categorical_accuracy()}
    ),
    input_spec={
      'x': jax.ShapeDtypeStruct((None, *example_shape), jnp.float32),
      'y': jax.ShapeDtypeStruct((None,), jnp.int32),
    },
  )
