"""`conv_general_dilated` with its gradient written in the form XLA:CPU runs fast inside loops.

Inside a `while_loop` or `scan` (every client's local loop is one), XLA:CPU leaves the
convolutions of JAX's default convolution gradient in non-canonical dimension orders
(`f01b_i01o->01bf`) and runs them through a slow generic emitter: a CNN step costs ~20× more
inside a loop than at top level. Written here as canonical `NHWC`/`HWIO` convolutions with
explicit transposes, the same gradient runs at full speed inside loops. The values are those of
`lax.conv_general_dilated`'s own gradient (same sums, reordered).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

_CANONICAL = ('NHWC', 'HWIO', 'NHWC')


def _pairs(padding, lhs_shape, rhs_shape) -> list[tuple[int, int]]:
  """Explicit `(low, high)` padding of the spatial dims for stride 1."""
  if isinstance(padding, str):
    return lax.padtype_to_pads(lhs_shape[1:3], rhs_shape[:2], (1, 1), padding)
  return [tuple(int(v) for v in p) for p in padding]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv(x, kernel, padding):
  return lax.conv_general_dilated(x, kernel, (1, 1), padding, dimension_numbers=_CANONICAL)


def _conv_fwd(x, kernel, padding):
  return _conv(x, kernel, padding), (x, kernel)


def _conv_bwd(padding, residuals, g):
  x, kernel = residuals
  kh, kw = kernel.shape[:2]
  (pt, pb), (pl, pr) = padding
  # d/dx: the full convolution of g with the flipped kernel, input and output channels swapped.
  flipped = jnp.transpose(jnp.flip(kernel, (0, 1)), (0, 1, 3, 2))
  dx_padding = [(kh - 1 - pt, kh - 1 - pb), (kw - 1 - pl, kw - 1 - pr)]
  dx = lax.conv_general_dilated(g, flipped, (1, 1), dx_padding, dimension_numbers=_CANONICAL)
  # d/dkernel[h, w, i, o] = sum over n, y, x of x_pad[n, y + h, x + w, i] g[n, y, x, o]: a
  # convolution whose batch is the input channels and whose features are the examples.
  x_pad = jnp.pad(x, [(0, 0), (pt, pb), (pl, pr), (0, 0)])
  lhs = jnp.transpose(x_pad, (3, 1, 2, 0))  # [in, H, W, batch]
  rhs = jnp.transpose(g, (1, 2, 0, 3))  # [out H, out W, batch, out] as HWIO
  dk = lax.conv_general_dilated(lhs, rhs, (1, 1), 'VALID', dimension_numbers=_CANONICAL)
  return dx, jnp.transpose(dk, (1, 2, 0, 3)).astype(kernel.dtype)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv_general_dilated(
  lhs: jax.Array,
  rhs: jax.Array,
  window_strides: Sequence[int],
  padding,
  lhs_dilation: Sequence[int] | None = None,
  rhs_dilation: Sequence[int] | None = None,
  dimension_numbers=None,
  feature_group_count: int = 1,
  batch_group_count: int = 1,
  precision=None,
  preferred_element_type=None,
) -> jax.Array:
  """`lax.conv_general_dilated`, with a loop-friendly gradient for the common 2-D case.

  For `NHWC` inputs, `HWIO` kernels, stride 1, no dilation and no grouping, the gradient is
  computed as canonical convolutions (see the module docstring); anything else is passed to
  `lax.conv_general_dilated` unchanged. Its signature is `lax.conv_general_dilated`'s, so flax
  layers take it as they are: `nn.Conv(..., conv_general_dilated=fl.models.conv_general_dilated)`.

  Args:
    lhs: inputs `[batch, height, width, in]` (for the fast path).
    rhs: kernel `[kh, kw, in, out]`.
    window_strides, padding, ...: as `lax.conv_general_dilated`.
  """
  numbers = lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
  canonical = lax.conv_dimension_numbers(lhs.shape, rhs.shape, _CANONICAL)
  fast = (
    lhs.ndim == 4
    and numbers == canonical
    and tuple(window_strides) == (1, 1)
    and all(d in (None, (1, 1), [1, 1]) for d in (lhs_dilation, rhs_dilation))
    and feature_group_count == 1
    and batch_group_count == 1
    and precision is None
    and preferred_element_type is None
  )
  if not fast:
    return lax.conv_general_dilated(
      lhs,
      rhs,
      window_strides,
      padding,
      lhs_dilation,
      rhs_dilation,
      dimension_numbers,
      feature_group_count,
      batch_group_count,
      precision,
      preferred_element_type,
    )
  pads = tuple(_pairs(padding, lhs.shape, rhs.shape))
  return _conv(lhs, rhs, pads)
