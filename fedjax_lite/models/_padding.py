"""`check_padding_invariance`: padded examples must change nothing a model computes.

Client work pads every client's batches to one shape and passes the padding mask as the loss's
`sample_weight` (and to `predict_on_batch_fn` where it takes `mask`). A loss that ignores
`sample_weight`, or a layer that computes statistics over the whole batch without the mask,
would silently train on padding; this check finds both before anything is compiled.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.models import _model

# Two real examples and two padded ones.
_MASK = np.array([1, 1, 0, 0], np.float32)


def _batch(input_spec, rng: np.random.Generator):
  """A batch of `len(_MASK)` examples: normal floats, and 0/1 integers (valid ids and labels
  for any model with two or more classes or rows)."""

  def leaf(spec):
    shape = (len(_MASK), *(1 if d is None else d for d in spec.shape[1:]))
    if jnp.issubdtype(spec.dtype, jnp.floating):
      return rng.normal(size=shape).astype(spec.dtype)
    return rng.integers(0, 2, size=shape).astype(spec.dtype)

  return jax.tree.map(leaf, input_spec)


def _with_padding(batch, padding):
  """`batch` with its padded rows taken from `padding`."""

  def mix(x, p):
    m = np.reshape(_MASK > 0, _MASK.shape + (1,) * (x.ndim - 1))
    return np.where(m, x, p)

  return jax.tree.map(mix, batch, padding)


def check_padding_invariance(model: _model.FunctionalModel) -> None:
  """Raises when the padded rows of a batch change its loss or its real rows' predictions.

  Runs the model twice in training mode on one batch whose padded rows hold zeros, then junk.

  Raises:
    ValueError: naming what mixes padding in (the predictions or the loss) and the fix.
  """
  rng = np.random.default_rng(0)
  real = _batch(model.input_spec, rng)
  zeros = _with_padding(real, jax.tree.map(np.zeros_like, real))
  junk = _with_padding(real, jax.tree.map(lambda x: x * 3 + 1, _batch(model.input_spec, rng)))
  key = jax.random.PRNGKey(0)
  mask = jnp.asarray(_MASK)

  @jax.jit  # one compile for both batches (op by op, a ResNet-18 took 9 s)
  def run(batch):
    if model.uses_forward_pass:  # the model masks padding itself (from_variable_model)
      out = model.forward_pass(model.initial_weights, batch, True, rng=key, mask=mask)
      return out.predictions, out.loss
    x, y = _model.split_batch(batch)
    predictions = model.predict_on_batch(model.initial_weights, x, True, rng=key, mask=mask)
    return predictions, model.loss(predictions, y, mask)

  (pred_a, loss_a), (pred_b, loss_b) = run(zeros), run(junk)
  real_rows = int(_MASK.sum())
  for a, b in zip(jax.tree.leaves(pred_a), jax.tree.leaves(pred_b), strict=True):
    if not np.allclose(a[:real_rows], b[:real_rows], rtol=1e-4, atol=1e-5, equal_nan=True):
      raise ValueError(
        "the model's predictions of real examples change with the batch's padded examples: "
        'a layer computes statistics over the batch (e.g. BatchNorm) without the padding '
        'mask. Take `mask` ([batch_size], 0 for padding) in predict_on_batch_fn and keep '
        'padding out of the statistics, or wrap a flax module with fl.models.from_flax, which '
        'passes it to BatchNorm.'
      )
  if not np.allclose(loss_a, loss_b, rtol=1e-4, atol=1e-5, equal_nan=True):
    raise ValueError(
      "the model's loss_fn ignores sample_weight: the loss of one batch changed from "
      f'{float(loss_a):.6g} to {float(loss_b):.6g} when only its padded examples (sample_weight '
      '0) changed, so training and metrics would count padding. Weight each example by '
      'sample_weight, e.g. fl.models.weighted_mean(per_example_loss, sample_weight), or use '
      'fl.models.softmax_cross_entropy / mean_squared_error.'
    )
