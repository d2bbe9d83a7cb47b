"""`with_compute_dtype`: mixed precision for any `FunctionalModel`.

The weights (the master copy every optimizer updates), the gradients, the client updates and
every aggregation stay in their own dtype (float32); only the forward and backward passes run in
the compute dtype (e.g. bfloat16): the weights and the floating inputs are cast on the way in and
the predictions cast back before the loss, so losses and metrics are summed in float32.
"""

from __future__ import annotations

import inspect
from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite.models import _model


def _cast_floats(tree: Any, dtype: Any) -> Any:
  def cast(x):
    x = jnp.asarray(x)
    return x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x

  return jax.tree.map(cast, tree)


def with_compute_dtype(model: _model.FunctionalModel, dtype: Any) -> _model.FunctionalModel:
  """`model` computing its forward pass in `dtype` with float32 master weights.

  Example:
    >>> model = fl.models.with_compute_dtype(fl.models.mlp_classifier(64, 10), jnp.bfloat16)

  Args:
    model: any `FunctionalModel`.
    dtype: a floating dtype, e.g. `jnp.bfloat16` or `jnp.float16`.

  Returns:
    A `FunctionalModel` with the same weights, loss, metrics and input spec whose
    `predict_on_batch` casts the weights and floating inputs to `dtype` and returns predictions
    in the weights' floating dtype.
  """
  if model.uses_forward_pass:
    raise ValueError(
      'with_compute_dtype casts predict_on_batch; this model trains through its own '
      'forward_pass (a variable model): cast inside the module instead (e.g. nnx dtype=)'
    )
  dtype = jnp.dtype(dtype)
  if not jnp.issubdtype(dtype, jnp.floating):
    raise ValueError(f'dtype must be a floating dtype such as bfloat16; got {dtype}')
  out_dtype = jnp.result_type(*jax.tree.leaves(model.initial_weights.trainable) or [jnp.float32])

  def predict(weights, x, training=True, **kwargs):  # kwargs: rng, mask, where `model` takes them
    predictions = model.predict_on_batch(
      _cast_floats(weights, dtype), _cast_floats(x, dtype), training, **kwargs
    )
    return _cast_floats(predictions, out_dtype)

  # The signature tells FunctionalModel which of rng and mask to pass, as `model`'s own does.
  positional = list(inspect.signature(predict).parameters.values())[:3]  # weights, x, training
  extra = [
    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=None)
    for name, used in (('rng', model.uses_rng), ('mask', model.uses_mask))
    if used
  ]
  predict.__signature__ = inspect.Signature([*positional, *extra])
  return _model.FunctionalModel(
    initial_weights=model.initial_weights,
    predict_on_batch_fn=predict,
    loss_fn=model.loss,
    metrics_fns=(
      model.initialize_metrics_state,
      model.update_metrics_state,
      model.finalize_metrics,
    ),
    report_local_outputs_fn=model.report_local_outputs,
    input_spec=model.input_spec,
  )
