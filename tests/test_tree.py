"""fedjax_lite.tree: optax's tree arithmetic under the library's names, and what optax lacks."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from optax import tree_utils as otu

from fedjax_lite import tree as tree_lib


def test_arithmetic_is_optaxs():
  assert tree_lib.tree_zeros_like is otu.tree_zeros_like
  assert tree_lib.tree_add is otu.tree_add
  assert tree_lib.tree_sub is otu.tree_sub
  assert tree_lib.tree_where is otu.tree_where


def test_arithmetic_skips_the_masked_half_of_a_partitioned_tree():
  """Reconstruction's halves hold `optax.MaskedNode()` where the other half's leaves are."""
  a = {'global': jnp.array([1.0, 2.0]), 'local': optax.MaskedNode()}
  b = {'global': jnp.array([0.5, 0.5]), 'local': optax.MaskedNode()}
  chex.assert_trees_all_close(
    tree_lib.tree_sub(a, b), {'global': jnp.array([0.5, 1.5]), 'local': optax.MaskedNode()}
  )
  chex.assert_trees_all_close(
    tree_lib.tree_where(jnp.array(False), a, tree_lib.tree_zeros_like(a)),
    {'global': jnp.zeros(2), 'local': optax.MaskedNode()},
  )


def test_sum_over_clients_keeps_only_the_rows_asked_for():
  x = {'f': np.arange(12, dtype=np.float32).reshape(4, 3), 'i': np.arange(4, dtype=np.int32)}
  keep = jnp.array([True, False, True, True])
  total = tree_lib.tree_sum_over_clients(x, keep)
  rows = np.array([0, 2, 3])
  chex.assert_trees_all_close(total, {'f': x['f'][rows].sum(0), 'i': x['i'][rows].sum()})
  assert total['i'].dtype == jnp.int32
  chex.assert_trees_all_close(
    tree_lib.tree_sum_over_clients(x), {'f': x['f'].sum(0), 'i': x['i'].sum()}
  )


@pytest.mark.parametrize('bad', [jnp.inf, -jnp.inf, jnp.nan, None])
def test_all_finite_agrees_with_an_element_check_unbatched_vmapped_and_nested(bad):
  # Finite values whose sum overflows (the fast path's sum is inf) are still finite.
  big = jnp.full((3, 4), 3e38, jnp.float32)
  tree = {'w': big, 'b': jnp.arange(4.0), 'n': jnp.arange(3)}  # int leaves are not checked
  if bad is not None:
    tree['b'] = tree['b'].at[2].set(bad)
  expected = bad is None
  assert bool(jax.jit(tree_lib.tree_all_finite)(tree)) is expected
  # Vmapped over 3 lanes, only the middle one holds `bad`; `n` is not batched.
  lanes = {'w': jnp.stack([big] * 3), 'b': jnp.stack([jnp.arange(4.0), tree['b'], jnp.ones(4)])}
  vmapped = jax.jit(jax.vmap(lambda t, n: tree_lib.tree_all_finite({**t, 'n': n}), (0, None)))
  np.testing.assert_array_equal(vmapped(lanes, tree['n']), [True, expected, True])
  nested = jax.vmap(jax.vmap(tree_lib.tree_all_finite))
  stacked = jax.tree.map(lambda x: jnp.stack([x, jnp.zeros_like(x)]), lanes)
  np.testing.assert_array_equal(nested(stacked), [[True, expected, True], [True] * 3])
  # Inside a differentiated function (the answer is a bool: it has no gradient of its own).
  loss = lambda b: jnp.where(tree_lib.tree_all_finite(b), jnp.sum(b**2), 0.0)
  np.testing.assert_allclose(jax.grad(loss)(jnp.arange(3.0)), [0.0, 2.0, 4.0])


def test_all_finite_and_spec_mismatch():
  assert bool(tree_lib.tree_all_finite({'a': jnp.ones(2), 'b': ()}))
  assert not bool(tree_lib.tree_all_finite({'a': jnp.array([1.0, jnp.nan])}))
  assert bool(tree_lib.tree_all_finite({}))
  spec = tree_lib.tree_specs({'w': jnp.zeros((2, 3))})
  assert tree_lib.tree_spec_mismatch(spec, {'w': jnp.zeros((2, 3))}) is None
  assert tree_lib.tree_spec_mismatch(spec, {'w': jnp.zeros((3,))}) == (
    "leaf ['w'] is float32[3]; expected float32[2, 3]"
  )
