"""`ModelWeights`, `BatchOutput` and `FunctionalModel`: a model as pure functions over weights."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite import tree as tree_lib


class ModelWeights(NamedTuple):
  """Model weights split as TFF splits them.

  Attributes:
    trainable: pytree of arrays that local training updates.
    non_trainable: pytree of arrays read but never trained (e.g. normalization statistics).
  """

  trainable: Any
  non_trainable: Any


class BatchOutput(NamedTuple):
  """What one forward pass over a batch produces.

  Fields default to None as in TFF; the order is docs/ARCHITECTURE.md's, so use keywords when
  porting TFF code (TFF's order is loss, predictions, num_examples).

  Attributes:
    predictions: model outputs, `[batch_size, ...]`.
    loss: `[]` mean loss over the batch's real examples.
    num_examples: `[]` number of real (unmasked) examples in the batch.
    local_updates: what the batch adds to the model's metric state, for a forward pass that
      updates its own local variables (`fl.models.from_variable_model`); None otherwise.
  """

  predictions: Any = None
  loss: Any = None
  num_examples: Any = None
  local_updates: Any = None


def split_batch(batch: Any) -> tuple[Any, Any]:
  """Splits a batch into `(x, y)`: a mapping with keys 'x' and 'y', or a 2-tuple (TFF's forms)."""
  if isinstance(batch, Mapping):
    if set(batch) != {'x', 'y'}:
      raise ValueError(
        f"a batch mapping must have exactly the keys 'x' and 'y'; got {sorted(batch)}"
      )
    return batch['x'], batch['y']
  if isinstance(batch, tuple | list) and len(batch) == 2:
    return batch[0], batch[1]
  raise TypeError(
    "a batch must be a mapping {'x': ..., 'y': ...} or a tuple (x, y); "
    f'got {type(batch).__name__}'
  )


def _empty_metrics_state():
  return ()


def _noop_update(state, labels, batch_output, sample_weight=None):
  del labels, batch_output, sample_weight
  return state


def _noop_finalize(state):
  del state
  return {}


def _accepts(fn: Callable, name: str) -> bool:
  """Whether `fn` takes the keyword argument `name` (by name or through `**kwargs`)."""
  try:
    params = inspect.signature(fn).parameters
  except (TypeError, ValueError):
    return False
  return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


def _check_concrete_weights(weights: ModelWeights) -> ModelWeights:
  paths = jax.tree_util.tree_flatten_with_path(weights)[0]
  for path, leaf in paths:
    if isinstance(leaf, jax.core.Tracer):
      raise TypeError(
        f'initial_weights leaf {tree_lib.keystr(path)} is a JAX tracer; expected a concrete array. '
        'Tip: build the FunctionalModel outside jit/vmap/grad.'
      )
    if not isinstance(leaf, np.ndarray | jax.Array | np.generic | float | int):
      raise TypeError(
        f'initial_weights leaf {tree_lib.keystr(path)} is a {type(leaf).__name__}; '
        'expected an array.'
      )
  return jax.tree.map(jnp.asarray, weights)


def _check_input_spec(input_spec: Any) -> None:
  try:
    split_batch(input_spec)
  except (TypeError, ValueError) as e:
    raise type(e)(f'input_spec describes one batch, so: {e}') from None
  paths = jax.tree_util.tree_flatten_with_path(input_spec)[0]
  for path, leaf in paths:
    if not isinstance(leaf, jax.ShapeDtypeStruct):
      raise TypeError(
        f'input_spec leaf {tree_lib.keystr(path)} is a {type(leaf).__name__}; '
        'expected jax.ShapeDtypeStruct (batch dimension first, may be None).'
      )


class FunctionalModel:
  """A model as pure functions of its weights, after `tff.learning.models.FunctionalModel`.

  Holds no mutable state: every method takes the weights it uses. Randomness (dropout) comes in
  as an explicit `rng` key, never as hidden state.

  Example:
    >>> def predict(weights, x, training=True):
    ...   return x @ weights.trainable['w']
    >>> model = FunctionalModel(
    ...     initial_weights=ModelWeights({'w': jnp.zeros((3, 2))}, ()),
    ...     predict_on_batch_fn=predict,
    ...     loss_fn=fl.models.softmax_cross_entropy,
    ...     input_spec={'x': jax.ShapeDtypeStruct((None, 3), jnp.float32),
    ...                 'y': jax.ShapeDtypeStruct((None,), jnp.int32)})

  Args:
    initial_weights: `ModelWeights(trainable, non_trainable)` (or a 2-tuple) of concrete arrays.
    forward_pass_fn: optional `(weights, batch_input, training[, rng][, mask]) -> BatchOutput`;
      by default `predict_on_batch_fn` then `loss_fn`. Used by `forward_pass` only, unless it
      takes `mask` (`[batch_size]`, 0 for padding): such a forward pass keeps padding out of
      its outputs itself, and training and evaluation run it instead of `predict_on_batch` and
      `loss` (`uses_forward_pass`).
    predict_on_batch_fn: `(weights, x, training[, rng][, mask]) -> predictions [batch_size,
      ...]`. A model whose predictions mix examples (batch normalization) takes `mask`
      (`[batch_size]`, 1 for real examples, 0 for padding; None when there is no padding) and
      keeps padding out of the mix.
    loss_fn: `(predictions, labels, sample_weight=None) -> [] loss`, the mean over examples
      weighted by `sample_weight` (a `[batch_size]` 0/1 mask during training).
    metrics_fns: optional `(initialize, update, finalize)` triple as made by
      `fl.metrics.create_functional_metric_fns`; `update(state, labels, batch_output,
      sample_weight)`.
    report_local_outputs_fn: optional `(weights, metrics_state) -> reported`, run once per
      client on its final weights and metric state (TFF's `report_local_outputs`, which may
      read every variable, e.g. the model's L2 norm). `reported` is summed over clients and
      handed to `finalize`; by default it is the metric state itself.
    input_spec: pytree of `jax.ShapeDtypeStruct` for one batch, `{'x': ..., 'y': ...}` or
      `(x, y)`; the leading (batch) dimension may be None.
  """

  def __init__(
    self,
    *,
    initial_weights: ModelWeights | tuple,
    predict_on_batch_fn: Callable,
    loss_fn: Callable,
    input_spec: Any,
    forward_pass_fn: Callable | None = None,
    metrics_fns: tuple[Callable, Callable, Callable] | None = None,
    report_local_outputs_fn: Callable | None = None,
  ):
    if not isinstance(initial_weights, tuple) or len(initial_weights) != 2:
      raise TypeError(
        'initial_weights must be ModelWeights(trainable, non_trainable) or a 2-tuple; '
        f'got {type(initial_weights).__name__}'
      )
    self._initial_weights = _check_concrete_weights(ModelWeights(*initial_weights))
    for name, fn in [('predict_on_batch_fn', predict_on_batch_fn), ('loss_fn', loss_fn)]:
      if not callable(fn):
        raise TypeError(f'{name} must be callable; got {type(fn).__name__}')
    if forward_pass_fn is not None and not callable(forward_pass_fn):
      raise TypeError(f'forward_pass_fn must be callable or None; got {forward_pass_fn!r}')
    if report_local_outputs_fn is not None and not callable(report_local_outputs_fn):
      raise TypeError(
        f'report_local_outputs_fn must be callable or None; got {report_local_outputs_fn!r}'
      )
    if metrics_fns is None:
      metrics_fns = (_empty_metrics_state, _noop_update, _noop_finalize)
    if (
      not isinstance(metrics_fns, tuple | list)
      or len(metrics_fns) != 3
      or not all(callable(f) for f in metrics_fns)
    ):
      raise TypeError(
        'metrics_fns must be a triple of callables (initialize, update, finalize); '
        f'got {metrics_fns!r}'
      )
    _check_input_spec(input_spec)
    self._predict_on_batch_fn = predict_on_batch_fn
    self._forward_pass_fn = forward_pass_fn
    self._report_local_outputs_fn = report_local_outputs_fn
    self._loss_fn = loss_fn
    self._metrics_fns = tuple(metrics_fns)
    self._input_spec = input_spec
    self._uses_rng = _accepts(predict_on_batch_fn, 'rng')
    self._uses_mask = _accepts(predict_on_batch_fn, 'mask')

  @property
  def initial_weights(self) -> ModelWeights:
    return self._initial_weights

  @property
  def input_spec(self) -> Any:
    return self._input_spec

  @property
  def uses_rng(self) -> bool:
    """Whether `predict_on_batch_fn` takes an `rng` key (e.g. for dropout)."""
    return self._uses_rng

  @property
  def uses_mask(self) -> bool:
    """Whether `predict_on_batch_fn` takes the padding `mask` (e.g. for batch statistics)."""
    return self._uses_mask

  @property
  def uses_forward_pass(self) -> bool:
    """Whether training and evaluation run `forward_pass` (its `forward_pass_fn` takes `mask`)
    instead of `predict_on_batch` then `loss`."""
    return self._forward_pass_fn is not None and _accepts(self._forward_pass_fn, 'mask')

  @property
  def predict_on_batch_fn(self) -> Callable:
    """The function given to the constructor (to rebuild the model with another loss)."""
    return self._predict_on_batch_fn

  def predict_on_batch(
    self, weights: ModelWeights, x: Any, training: bool = True, rng=None, mask=None
  ):
    """Predictions `[batch_size, ...]` for inputs `x` `[batch_size, ...]`; `rng` and `mask`
    (`[batch_size]`) reach `predict_on_batch_fn` where it takes them."""
    kwargs = {}
    if self._uses_rng:
      kwargs['rng'] = rng
    if self._uses_mask and mask is not None:
      kwargs['mask'] = mask
    return self._predict_on_batch_fn(weights, x, training, **kwargs)

  def loss(self, output: Any, label: Any, sample_weight: Any = None) -> jax.Array:
    """`[]` loss: mean over examples, weighted by `sample_weight` `[batch_size]`."""
    return self._loss_fn(output, label, sample_weight)

  def forward_pass(
    self, weights: ModelWeights, batch_input: Any, training: bool = True, rng=None, mask=None
  ) -> BatchOutput:
    """`BatchOutput` of one batch: unpadded, or padded with `mask` `[batch_size]` when
    `uses_forward_pass`."""
    if self._forward_pass_fn is not None:
      kwargs = {}
      if _accepts(self._forward_pass_fn, 'rng'):
        kwargs['rng'] = rng
      if mask is not None and self.uses_forward_pass:
        kwargs['mask'] = mask
      return self._forward_pass_fn(weights, batch_input, training, **kwargs)
    x, y = split_batch(batch_input)
    predictions = self.predict_on_batch(weights, x, training, rng=rng)
    num_examples = jnp.asarray(jax.tree.leaves(y)[0].shape[0], jnp.int32)
    return BatchOutput(predictions, self.loss(predictions, y), num_examples)

  def initialize_metrics_state(self) -> Any:
    return self._metrics_fns[0]()

  def update_metrics_state(
    self, state: Any, labels: Any, batch_output: BatchOutput, sample_weight: Any = None
  ) -> Any:
    return self._metrics_fns[1](state, labels, batch_output, sample_weight)

  def report_local_outputs(self, weights: ModelWeights, state: Any) -> Any:
    """What a client reports from its final `weights` and metric `state` (summed over clients,
    then `finalize_metrics`); the state itself unless `report_local_outputs_fn` was given."""
    if self._report_local_outputs_fn is None:
      return state
    return self._report_local_outputs_fn(weights, state)

  def finalize_metrics(self, state: Any) -> dict:
    return self._metrics_fns[2](state)
