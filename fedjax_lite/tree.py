"""Pytree helpers shared by every module, in one place.

The arithmetic helpers are `optax.tree_utils`' (re-exported here under the same names, so
callers import one module); only what optax lacks is written below.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from optax import tree_utils as _optax_tree

PyTree = Any

# `tree_zeros_like(tree)`, `tree_add(a, b, *more)`, `tree_sub(a, b)` and
# `tree_where(cond, a, b)` (leafwise `jnp.where` with one `cond` for every leaf).
tree_zeros_like = _optax_tree.tree_zeros_like
tree_add = _optax_tree.tree_add
tree_sub = _optax_tree.tree_sub
tree_where = _optax_tree.tree_where


def _axes_but(x: jax.Array, axis: int | None) -> tuple[int, ...]:
  return tuple(a for a in range(x.ndim) if a != axis)


def _leaves_finite(leaves: list[jax.Array], axis: int | None = None) -> jax.Array:
  """Whether every element is finite, over all axes but `axis` (kept, when given)."""
  finite = [jnp.all(jnp.isfinite(x), axis=_axes_but(x, axis)) for x in leaves]
  return jnp.stack(finite).all(axis=0)


def _leaf_sums(leaves: list[jax.Array], axis: int | None = None) -> jax.Array:
  """The sum of every leaf's elements, over all axes but `axis` (kept, when given)."""
  return sum(jnp.sum(x, axis=_axes_but(x, axis), dtype=x.dtype) for x in leaves)


def _finite_fast(leaves: list[jax.Array], axis: int | None = None) -> jax.Array:
  """`_leaves_finite`, settled by one sum a leaf when every sum is finite.

  A non-finite element makes its leaf's sum non-finite: one sum a leaf (one pass, which XLA:CPU
  runs several times faster than an element-wise check and its reduction) settles the common
  case; a sum that is not finite (an inf or NaN, or finite values overflowing) is settled
  element by element. With `axis` (the lanes of a vmap), the fast path is taken when every
  lane's sums are finite, so the `cond` stays a branch instead of becoming a select that runs
  both sides.
  """
  lanes = () if axis is None else (leaves[0].shape[axis],)
  return lax.cond(
    jnp.all(jnp.isfinite(_leaf_sums(leaves, axis))),
    lambda _: jnp.ones(lanes, bool),
    lambda leaves: _leaves_finite(leaves, axis),
    leaves,
  )


@jax.custom_batching.custom_vmap
def _all_finite(leaves: list[jax.Array]) -> jax.Array:
  return _finite_fast(leaves)


@_all_finite.def_vmap
def _all_finite_vmap(axis_size, in_batched, leaves):
  (batched,) = in_batched
  leaves = [
    x if b else jnp.broadcast_to(x, (axis_size, *x.shape))
    for x, b in zip(leaves, batched, strict=True)
  ]
  return _finite_fast(leaves, axis=0), True


def tree_all_finite(tree: PyTree) -> jax.Array:
  """A `[] bool`: True when every element of every leaf is finite."""
  leaves = [x for x in jax.tree.leaves(tree) if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
  if not leaves:
    return jnp.array(True)
  # The answer is a bool: nothing to differentiate, and `custom_vmap` has no JVP rule.
  return _all_finite([lax.stop_gradient(jnp.asarray(x)) for x in leaves])


def tree_sum_over_clients(tree: PyTree, keep: jax.Array | None = None) -> PyTree:
  """Sums leaves `[clients, ...]` over their leading axis, only the rows where `keep` is True.

  Floating leaves are summed as a matrix-vector product: XLA:CPU runs that several times faster
  than a reduction over the leading axis (a FedAvg round's accumulation was a third of it). One
  client is its own sum: element-wise, it fuses with whatever adds it up.
  """

  def total(x):
    if keep is not None:
      k = jnp.reshape(keep, keep.shape + (1,) * (x.ndim - 1))
      x = jnp.where(k, x, jnp.zeros((), x.dtype))
    if x.shape[0] == 1:
      return x[0]
    if jnp.issubdtype(x.dtype, jnp.floating):
      return jnp.tensordot(jnp.ones(x.shape[:1], x.dtype), x, axes=(0, 0))
    return jnp.sum(x, axis=0)

  return jax.tree.map(total, tree)


def tree_strong_types(tree: PyTree) -> PyTree:
  """Arrays with weak types made strong, so a later set of the same dtype never retraces."""
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.result_type(x)), tree)


def tree_specs(tree: PyTree) -> PyTree:
  """The `jax.ShapeDtypeStruct` of every leaf."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.result_type(x)), tree)


def tree_spec_mismatch(expected: PyTree, got: PyTree) -> str | None:
  """Says how two trees of arrays/specs differ in structure, shape or dtype; None if they agree."""
  expected_struct = jax.tree.structure(expected)
  got_struct = jax.tree.structure(got)
  if expected_struct != got_struct:
    return f'tree structure differs: expected {expected_struct}, got {got_struct}'
  paths = jax.tree_util.tree_flatten_with_path(expected)[0]
  for (path, e), g in zip(paths, jax.tree.leaves(got), strict=True):
    e_shape, g_shape = tuple(np.shape(e)), tuple(np.shape(g))
    e_dtype, g_dtype = jnp.result_type(e), jnp.result_type(g)
    if e_shape != g_shape or e_dtype != g_dtype:
      return (
        f'leaf {keystr(path)} is {g_dtype.name}{list(g_shape)}; '
        f'expected {e_dtype.name}{list(e_shape)}'
      )
  return None


def keystr(path: tuple) -> str:
  """A readable leaf path, e.g. `trainable['dense']['kernel']`; `<root>` for the empty path."""
  return jax.tree_util.keystr(path) or '<root>'
