"""`from_flax`: a `FunctionalModel` from a flax linen or nnx module."""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen, nnx

from fedjax_lite.models import _model


def _example_input(input_spec: Any) -> Any:
  x_spec, _ = _model.split_batch(input_spec)
  return jax.tree.map(
    lambda s: jnp.zeros(tuple(1 if d is None else d for d in s.shape), s.dtype), x_spec
  )


def from_flax(
  module: linen.Module | nnx.Module,
  *,
  input_spec: Any,
  loss_fn: Callable,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  seed: int = 0,
  training_arg: str | None = None,
) -> _model.FunctionalModel:
  """Wraps a flax module as a `FunctionalModel`.

  linen: the `params` collection is trainable, every other collection non-trainable; weights
  come from `module.init(PRNGKey(seed), x)`. nnx: `nnx.Param` variables are trainable, every
  other variable non-trainable; weights are the module's current values.

  Non-trainable collections (e.g. `batch_stats`) are read, never updated, by training: a
  FunctionalModel's forward pass returns no new weights (TFF's semantics). Batch normalization
  (`BatchNorm`, linen's and nnx's) gets the padding mask, so its batch statistics count real
  examples only; padding changes nothing.

  Args:
    module: an unbound `linen.Module`, or an `nnx.Module` instance.
    input_spec: pytree of `jax.ShapeDtypeStruct` for one batch, `{'x': ..., 'y': ...}`.
    loss_fn: `(predictions, labels, sample_weight=None) -> []`.
    metrics_fns: optional `(initialize, update, finalize)` triple.
    seed: linen only: the seed of `module.init`.
    training_arg: linen only: the name of the module's `__call__` argument that tells training
      from inference (e.g. 'train'); it receives `training`. nnx modules are switched with
      `.train()` / `.eval()`.

  Returns:
    A `FunctionalModel` whose `predict_on_batch(weights, x, training, rng=None, mask=None)`
    equals the
    module's own `apply` (linen) or call (nnx). `rng` feeds linen's 'dropout' stream and
    reseeds every rng stream an nnx module holds. (An nnx module that takes `rngs` as a call
    argument is not supported: its dropout needs the stream it is built with.)
  """
  if isinstance(module, linen.Module):
    initial_weights, predict = _from_linen(module, input_spec, seed, training_arg)
  elif isinstance(module, nnx.Module):
    if training_arg is not None:
      raise ValueError('training_arg applies to linen modules; nnx modules use .train()/.eval()')
    initial_weights, predict = _from_nnx(module)
  else:
    raise TypeError(
      f'module must be a flax linen.Module or nnx.Module; got {type(module).__name__}'
    )
  return _model.FunctionalModel(
    initial_weights=initial_weights,
    predict_on_batch_fn=predict,
    loss_fn=loss_fn,
    metrics_fns=metrics_fns,
    input_spec=input_spec,
  )


def _from_linen(module, input_spec, seed, training_arg):
  kwargs = {} if training_arg is None else {training_arg: False}
  init = jax.jit(functools.partial(module.init, **kwargs))  # one compile, not one per op
  variables = init(jax.random.PRNGKey(seed), _example_input(input_spec))
  variables = dict(variables)
  trainable = variables.pop('params', {})
  non_trainable = variables

  def predict(weights, x, training=True, rng=None, mask=None):
    call_kwargs = {} if training_arg is None else {training_arg: training}
    rngs = None if rng is None else {'dropout': rng}
    variables = {'params': weights.trainable, **weights.non_trainable}
    with _masked_linen_batch_norm(mask):
      if training and weights.non_trainable:
        # Collections such as batch_stats may be written in training mode; the writes are
        # dropped.
        out, _ = module.apply(
          variables, x, rngs=rngs, mutable=list(weights.non_trainable), **call_kwargs
        )
        return out
      return module.apply(variables, x, rngs=rngs, **call_kwargs)

  return _model.ModelWeights(trainable, non_trainable), predict


def _from_nnx(module):
  graphdef, trainable, non_trainable = nnx.split(module, nnx.Param, ...)
  # The streams a module draws from at call time (e.g. Dropout's, 'dropout' or 'default'):
  # `rng` reseeds every one, so each key gives its own masks.
  stream_tags = sorted(
    {node.tag for _, node in nnx.iter_graph(module) if isinstance(node, nnx.RngStream)}
  )
  trainable = nnx.to_pure_dict(trainable)
  non_trainable = nnx.to_pure_dict(non_trainable)

  def predict(weights, x, training=True, rng=None, mask=None):
    _, abstract_params, abstract_rest = nnx.split(module, nnx.Param, ...)
    nnx.replace_by_pure_dict(abstract_params, weights.trainable)
    nnx.replace_by_pure_dict(abstract_rest, weights.non_trainable)
    model = nnx.merge(graphdef, abstract_params, abstract_rest)
    if training:
      model.train()
    else:
      model.eval()
    if rng is not None and stream_tags:
      nnx.reseed(model, **{tag: rng for tag in stream_tags})
    if mask is None:
      return model(x)
    for _, node in nnx.iter_graph(model):
      if isinstance(node, nnx.BatchNorm):
        node.__class__ = _masked_nnx_class(type(node))
    token = _NNX_MASK.set(mask)
    try:
      return model(x)
    finally:
      _NNX_MASK.reset(token)

  return _model.ModelWeights(trainable, non_trainable), predict


def _broadcast_mask(mask: jax.Array, x: jax.Array) -> jax.Array | None:
  """`mask` `[batch_size]` shaped to broadcast against `x` `[batch_size, ...]`; None when `x`
  has no such leading axis (the padding check of the client work then reports the model)."""
  if x.ndim == 0 or x.shape[0] != mask.shape[0]:
    return None
  return jnp.reshape(mask > 0, mask.shape + (1,) * (x.ndim - 1))


@contextlib.contextmanager
def _masked_linen_batch_norm(mask: jax.Array | None):
  """Within: every linen `BatchNorm` call that has no mask of its own gets `mask`."""
  if mask is None:
    yield
    return

  def interceptor(next_fun, args, kwargs, context):
    if (
      isinstance(context.module, linen.BatchNorm)
      and context.method_name == '__call__'
      and kwargs.get('mask') is None
      and args
    ):
      kwargs = {**kwargs, 'mask': _broadcast_mask(mask, args[0])}
    return next_fun(*args, **kwargs)

  with linen.intercept_methods(interceptor):
    yield


# The padding mask of the nnx call in progress, read by the masked BatchNorm classes below.
_NNX_MASK: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar('mask', default=None)
_MASKED_NNX_CLASSES: dict[type, type] = {}


def _masked_nnx_class(cls: type) -> type:
  """A subclass of an nnx `BatchNorm` class whose calls take the mask in `_NNX_MASK`."""
  if cls not in _MASKED_NNX_CLASSES:

    def __call__(self, x, use_running_average=None, *, mask=None):
      current = _NNX_MASK.get()
      if mask is None and current is not None:
        mask = _broadcast_mask(current, x)
      return cls.__call__(self, x, use_running_average, mask=mask)

    _MASKED_NNX_CLASSES[cls] = type(f'Masked{cls.__name__}', (cls,), {'__call__': __call__})
  return _MASKED_NNX_CLASSES[cls]
