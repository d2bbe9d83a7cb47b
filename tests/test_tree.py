"""fedjax_lite.tree: optax's tree arithmetic under the library's names, and what optax lacks."""

import chex
import jax.numpy as jnp
import numpy as np
import optax
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


def test_all_finite_and_spec_mismatch():
  assert bool(tree_lib.tree_all_finite({'a': jnp.ones(2), 'b': ()}))
  assert not bool(tree_lib.tree_all_finite({'a': jnp.array([1.0, jnp.nan])}))
  assert bool(tree_lib.tree_all_finite({}))
  spec = tree_lib.tree_specs({'w': jnp.zeros((2, 3))})
  assert tree_lib.tree_spec_mismatch(spec, {'w': jnp.zeros((2, 3))}) is None
  assert tree_lib.tree_spec_mismatch(spec, {'w': jnp.zeros((3,))}) == (
    "leaf ['w'] is float32[3]; expected float32[2, 3]"
  )
