"""`from_variable_model`: TFF's variable model (`tff.learning.models.VariableModel`) written as a
flax nnx module, turned into a `FunctionalModel`.

A variable model holds its state in variables: `nnx.Param`s are the trainable weights, every
other weight variable (e.g. `nnx.BatchStat`) non-trainable, and `LocalVariable`s are TFF's local
variables, the accumulators that `forward_pass` adds to (a loss total, an example count). The
module's methods follow TFF's protocol:

- `input_spec`: one batch as `jax.ShapeDtypeStruct`s, `{'x': ..., 'y': ...}` or `(x, y)`;
- `forward_pass(batch, training=True) -> fl.BatchOutput`, which may add to local variables;
- `report_local_unfinalized_metrics()` and `metric_finalizers()` (TFF's current API), or
  `report_local_outputs()` (the older one); either may read every variable, weights included.

Pure functions of the weights are made with `nnx.split` / `nnx.merge`: local variables become
the `FunctionalModel`'s metric state, so they start from their initial values (what each
`LocalVariable` was constructed with, TFF's initializer: a module called before wrapping starts no
client from what that call accumulated) for every client every round, stay inside the client
work, and what a client reports from them is summed over clients, then finalized (TFF's
`sum_then_finalize`).

Padding: `forward_pass` knows nothing of masks, so it runs on each example alone (vmapped) and
padded examples are dropped: the batch loss is the mean of the real examples' losses and every
local variable moves by the sum of their changes. That is exact when the loss is a mean over
examples, the layers treat examples independently, and local variables are sums over examples
(TFF's metric variables: totals and counts); a per-batch counter would count examples. A layer
that mixes examples (BatchNorm in training mode) would see one example at a time, normalize it by
itself to zero and never learn: such a module is refused at construction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from fedjax_lite import tree as tree_lib
from fedjax_lite.models import _losses, _model


class LocalVariable(nnx.Variable):
  """A TFF local variable: an accumulator `forward_pass` adds to, e.g. a loss total or an
  example count. Reset for every client every round to the value it was constructed with (its
  `initial_value`, TFF's initializer), never sent to the server; fixed shape and dtype. Writes to
  `nnx.Param`s are not allowed and writes to other weights are dropped."""

  __slots__ = ('_initial_value',)

  def __init__(self, value: Any, **metadata: Any):
    super().__init__(value, **metadata)
    initial = self.get_value()
    if isinstance(initial, jax.core.Tracer):  # made inside a trace: no value to keep
      initial = None
    elif isinstance(initial, np.ndarray):  # numpy values may be written in place
      initial = initial.copy()
    object.__setattr__(self, '_initial_value', initial)

  @property
  def initial_value(self) -> Any:
    """The value this variable was constructed with; None when unknown (a copy made by
    `nnx.clone` or `copy.deepcopy`, or a variable made inside a trace)."""
    return getattr(self, '_initial_value', None)


def _with_values(module: nnx.Module, local_variables, trainable, non_trainable) -> nnx.Module:
  """`module` with the variables given as pure dicts (a new module; `module` is untouched)."""
  graphdef, *states = nnx.split(module, LocalVariable, nnx.Param, ...)
  for state, values in zip(states, (local_variables, trainable, non_trainable), strict=True):
    nnx.replace_by_pure_dict(state, values)
  return nnx.merge(graphdef, *states)


def _values(module: nnx.Module) -> tuple[Any, Any, Any]:
  """`(local variables, trainable, non-trainable)` of `module` as pure dicts."""
  return tuple(nnx.to_pure_dict(s) for s in nnx.split(module, LocalVariable, nnx.Param, ...)[1:])


def _initial_locals(module: nnx.Module, current: Any) -> Any:
  """The local variables' initial values as a pure dict like `current` (their values now):
  each `LocalVariable.initial_value` of the same shape, else its value now."""
  flat = traverse_util.flatten_dict(current)
  for path, node in nnx.iter_graph(module):
    if isinstance(node, LocalVariable) and path in flat:
      initial = node.initial_value
      if initial is not None and np.shape(initial) == np.shape(flat[path]):
        flat[path] = initial
  return traverse_util.unflatten_dict(flat) if flat else current


def _reporting(module: nnx.Module) -> tuple[Callable, Callable]:
  """`(report(module) -> reported, finalize(summed reported) -> metrics dict)`."""
  if getattr(module, 'federated_output_computation', None) is not None:
    raise ValueError(
      "the module defines federated_output_computation, which needs every client's outputs at "
      'once; here reported outputs are summed over clients inside the round, then finalized. '
      'Tip: report unfinalized sums with report_local_unfinalized_metrics() and finish them in '
      'metric_finalizers() (a mean of per-client values reports (value, 1)).'
    )
  if callable(getattr(module, 'report_local_unfinalized_metrics', None)):
    if not callable(getattr(module, 'metric_finalizers', None)):
      raise TypeError(
        "the module has report_local_unfinalized_metrics() but no metric_finalizers(); TFF's "
        'protocol pairs them: metric_finalizers() maps each reported name to a function of its '
        'summed unfinalized value'
      )
    finalizers = dict(module.metric_finalizers())

    def finalize(summed):
      return {name: finalizers[name](value) for name, value in summed.items()}

    return lambda m: dict(m.report_local_unfinalized_metrics()), finalize
  if callable(getattr(module, 'report_local_outputs', None)):
    return lambda m: dict(m.report_local_outputs()), dict
  return lambda m: {}, dict


def _batch_of(input_spec: Any, x: Any, y: Any) -> Any:
  """A batch `(x, y)` in the structure of `input_spec` (a mapping or a pair)."""
  return {'x': x, 'y': y} if isinstance(input_spec, Mapping) else (x, y)


def from_variable_model(module: nnx.Module) -> _model.FunctionalModel:
  """A `FunctionalModel` from an nnx module written as TFF's variable model (see the module
  docstring for the protocol).

  Example:
    >>> class Model(nnx.Module):
    ...   def __init__(self, rngs):
    ...     self.dense = nnx.Linear(64, 10, rngs=rngs)
    ...     self.loss_sum = fl.models.LocalVariable(jnp.zeros(()))
    ...     self.num_examples = fl.models.LocalVariable(jnp.zeros((), jnp.int32))
    ...     self.input_spec = {'x': jax.ShapeDtypeStruct((None, 64), jnp.float32),
    ...                        'y': jax.ShapeDtypeStruct((None,), jnp.int32)}
    ...   def forward_pass(self, batch, training=True):
    ...     logits = self.dense(batch['x'])
    ...     loss = fl.models.softmax_cross_entropy(logits, batch['y'])
    ...     n = batch['y'].shape[0]
    ...     self.loss_sum[...] += loss * n
    ...     self.num_examples[...] += n
    ...     return fl.BatchOutput(predictions=logits, loss=loss, num_examples=n)
    ...   def report_local_unfinalized_metrics(self):
    ...     return {'loss': (self.loss_sum[...], self.num_examples[...])}
    ...   def metric_finalizers(self):
    ...     return {'loss': lambda s: s[0] / s[1]}
    >>> model = fl.models.from_variable_model(Model(nnx.Rngs(0)))

  Args:
    module: the nnx module, its weights at their initial values. Its local variables start
      from the values they were constructed with, whatever the module has been called on since.

  Returns:
    A `FunctionalModel` with `initial_weights = ModelWeights(nnx.Param values, other weight
    values)` as pure dicts; local variables are its metric state (`initialize_metrics_state()`:
    their initial values), `report_local_outputs(weights, local variables)` reads the merged module,
    and training and evaluation run the module's `forward_pass` (`uses_forward_pass`).
    `predict_on_batch` is `forward_pass`'s predictions (labels zero); the model has no loss of
    predictions alone (`loss` raises), so builders take no `loss_fn` for it.

  Raises:
    TypeError: the module is not an nnx module, has no `forward_pass` or `input_spec`, or its
      `forward_pass` returns no `BatchOutput` with a `[]` loss.
    ValueError: `forward_pass` writes an `nnx.Param` or changes a local variable's shape or
      dtype; it runs a BatchNorm in training mode (batch statistics, which one example at a
      time cannot give); the module holds rng streams; it defines
      `federated_output_computation`.
  """
  if not isinstance(module, nnx.Module):
    raise TypeError(f'module must be an nnx.Module; got {type(module).__name__}')
  if not callable(getattr(module, 'forward_pass', None)):
    raise TypeError(
      f"{type(module).__name__} has no forward_pass method; a variable model (TFF's "
      'tff.learning.models.VariableModel) defines forward_pass(batch, training=True) -> '
      'fl.BatchOutput'
    )
  input_spec = getattr(module, 'input_spec', None)
  if input_spec is None:
    raise TypeError(
      f'{type(module).__name__} has no input_spec; a variable model describes one batch as '
      "{'x': jax.ShapeDtypeStruct(...), 'y': ...} (batch dimension None)"
    )
  if jax.tree.leaves(nnx.state(module, nnx.RngState)):
    raise ValueError(
      f'{type(module).__name__} holds rng streams (e.g. nnx.Dropout(rngs=...)); a variable '
      'model with randomness is not supported. Tip: wrap it with fl.models.from_flax, whose '
      'rng reaches every stream.'
    )
  report, finalize = _reporting(module)
  current_locals, trainable, non_trainable = _values(module)
  # Every client starts from the initial values, even if the module was called before wrapping.
  initial_locals = _initial_locals(module, current_locals)
  x_spec, y_spec = _model.split_batch(input_spec)

  def run_one(weights, example, training):
    """The module's forward pass on one example (leaves without a batch axis); returns
    `(BatchOutput, new local variables, new trainable, new non-trainable)`."""
    model = _with_values(module, initial_locals, weights.trainable, weights.non_trainable)
    out = model.forward_pass(jax.tree.map(lambda v: v[None], example), training=training)
    return out, *_values(model)

  def forward_pass(weights, batch, training=True, mask=None):
    num = jax.tree.leaves(batch)[0].shape[0]
    mask = jnp.ones((num,), jnp.float32) if mask is None else mask

    def one(example):
      out, new_locals, _, _ = run_one(weights, example, training)
      predictions = jax.tree.map(lambda p: p[0], out.predictions)
      return predictions, out.loss, tree_lib.tree_sub(new_locals, initial_locals)

    predictions, losses, changes = jax.vmap(one)(batch)
    real = mask > 0

    def masked_sum(c):
      return jnp.sum(jnp.where(jnp.reshape(real, real.shape + (1,) * (c.ndim - 1)), c, 0), 0)

    return _model.BatchOutput(
      predictions=predictions,
      loss=_losses.weighted_mean(losses, mask),
      num_examples=jnp.sum(real).astype(jnp.int32),
      local_updates=jax.tree.map(masked_sum, changes),
    )

  def predict(weights, x, training=True):
    num = jax.tree.leaves(x)[0].shape[0]
    y = jax.tree.map(lambda s: jnp.zeros((num, *s.shape[1:]), s.dtype), y_spec)
    return forward_pass(weights, _batch_of(input_spec, x, y), training).predictions

  def report_local_outputs(weights, local_variables):
    return report(_with_values(module, local_variables, weights.trainable, weights.non_trainable))

  def update(state, labels, batch_output, sample_weight=None):
    del labels, sample_weight  # the forward pass masked its local updates already
    return tree_lib.tree_add(state, batch_output.local_updates)

  weights = _model.ModelWeights(trainable, non_trainable)
  _check_forward_pass(module, run_one, weights, initial_locals, x_spec, y_spec, input_spec)
  return _model.FunctionalModel(
    initial_weights=weights,
    predict_on_batch_fn=predict,
    loss_fn=_no_loss_of_predictions,
    input_spec=input_spec,
    forward_pass_fn=forward_pass,
    metrics_fns=(lambda: initial_locals, update, finalize),
    report_local_outputs_fn=report_local_outputs,
  )


def _no_loss_of_predictions(predictions, labels, sample_weight=None):
  del predictions, labels, sample_weight
  raise TypeError(
    'a variable model has no loss of predictions alone: its loss comes from forward_pass, which '
    'training and evaluation run. Tip: pass no loss_fn (nor metrics_fns) to a builder for a '
    'model made by from_variable_model.'
  )


def _batch_norms(module: nnx.Module) -> list[tuple[tuple, nnx.Module]]:
  """`(path, layer)` of every layer that normalizes by batch statistics: nnx's BatchNorm and
  any module class named like one."""
  return [
    (path, node)
    for path, node in nnx.iter_modules(module)
    if isinstance(node, nnx.BatchNorm) or 'batchnorm' in type(node).__name__.lower()
  ]


def _written(before: Any, after: Any) -> list[tuple]:
  """Key paths of the leaves of `after` (a pure dict like `before`) that are not `before`'s."""
  paths = [p for p, _ in jax.tree_util.tree_flatten_with_path(before)[0]]
  leaves = zip(paths, jax.tree.leaves(before), jax.tree.leaves(after), strict=True)
  return [p for p, a, b in leaves if a is not b]


def _check_forward_pass(
  module, run_one, weights, initial_locals, x_spec, y_spec, input_spec
) -> None:
  """Traces `forward_pass` on one example (nothing is computed) and raises on what breaks it."""
  example = _batch_of(
    input_spec,
    *(
      jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape[1:], s.dtype), s)
      for s in (x_spec, y_spec)
    ),
  )
  written, written_non_trainable = [], []

  def probe(weights, example):
    out, new_locals, new_trainable, new_non_trainable = run_one(weights, example, True)
    written.extend(_written(weights.trainable, new_trainable))
    written_non_trainable.extend(_written(weights.non_trainable, new_non_trainable))
    return out, new_locals

  out, new_locals = jax.eval_shape(probe, weights, example)
  if written:
    raise ValueError(
      f'forward_pass writes the nnx.Param {", ".join(map(tree_lib.keystr, written))}; trainable '
      'weights change only by the optimizer. Tip: keep what forward_pass accumulates in '
      'fl.models.LocalVariable.'
    )
  for path, layer in _batch_norms(module):
    updated = [p for p in written_non_trainable if tuple(k.key for k in p[: len(path)]) == path]
    if updated:
      raise ValueError(
        f'{".".join([type(module).__name__, *map(str, path)])} is a {type(layer).__name__} that '
        f'forward_pass(training=True) runs on batch statistics (it updates '
        f"{', '.join(map(tree_lib.keystr, updated))}). A variable model's forward_pass runs on one "
        'example at a time (to drop padded examples), so the layer would normalize each example '
        'by itself to zero and the model could not learn. Tip: give the module a __call__(x) -> '
        "predictions and wrap it with fl.models.from_flax, which masks BatchNorm's statistics; "
        'or use a per-example normalization (nnx.LayerNorm, nnx.GroupNorm); or freeze the layer '
        '(use_running_average=True).'
      )
  if not isinstance(out, _model.BatchOutput) or getattr(out.loss, 'shape', None) != ():
    raise TypeError(
      'forward_pass must return fl.BatchOutput(predictions=..., loss=[] mean loss, '
      f'num_examples=...); got {out}'
    )
  mismatch = tree_lib.tree_spec_mismatch(tree_lib.tree_specs(initial_locals), new_locals)
  if mismatch is not None:
    raise ValueError(
      f'forward_pass changes its local variables: {mismatch} after one example. A local '
      "variable keeps its shape and dtype whatever the client's data, since clients' values are "
      'summed. Tip: accumulate a fixed-shape total (and a count), not a growing list.'
    )
