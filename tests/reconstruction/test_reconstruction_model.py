"""ReconstructionModel: partitions, split/merge as exact inverses, flax submodules, errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import fedjax_lite as fl
import fedjax_lite.reconstruction

# Random nested dict/list/tuple trees of small arrays, and a random bool per leaf.
_leaf = st.integers(0, 3).map(lambda n: np.arange(n, dtype=np.float32))
_trees = st.recursive(
  _leaf,
  lambda children: st.one_of(
    st.dictionaries(st.text('abc', min_size=1, max_size=3), children, max_size=3),
    st.lists(children, max_size=3),
    st.lists(children, max_size=3).map(tuple),
  ),
  max_leaves=8,
)


@settings(max_examples=60, deadline=None)
@given(trainable=_trees, non_trainable=_trees, data=st.data())
def test_split_merge_are_inverses(trainable, non_trainable, data):
  weights = fl.ModelWeights(trainable, non_trainable)
  num_leaves = len(jax.tree.leaves(weights))
  flags = data.draw(st.lists(st.booleans(), min_size=num_leaves, max_size=num_leaves))
  partition = jax.tree.structure(weights).unflatten(flags)
  global_part, local_part = fl.reconstruction.split(weights, partition)
  # Each half holds exactly its leaves, in order; the other half's are masked.
  leaves = jax.tree.leaves(weights)
  assert len(jax.tree.leaves(local_part)) == sum(flags)
  for got, want in zip(
    jax.tree.leaves(local_part), [x for x, f in zip(leaves, flags, strict=True) if f], strict=True
  ):
    assert got is want
  for got, want in zip(
    jax.tree.leaves(global_part),
    [x for x, f in zip(leaves, flags, strict=True) if not f],
    strict=True,
  ):
    assert got is want
  merged = fl.reconstruction.merge(global_part, local_part)
  assert jax.tree.structure(merged) == jax.tree.structure(weights)
  assert all(a is b for a, b in zip(jax.tree.leaves(merged), leaves, strict=True))
  # And the other way round: split(merge(g, l)) == (g, l).
  again = fl.reconstruction.split(merged, partition)
  for a, b in zip(again, (global_part, local_part), strict=True):
    assert jax.tree.structure(a) == jax.tree.structure(b)


WEIGHTS = fl.ModelWeights(
  {'user': {'e': jnp.ones(3), 'b': jnp.zeros(())}, 'item': jnp.ones((4, 3))}, {'stat': jnp.ones(2)}
)


def test_partition_forms_agree():
  full = fl.ModelWeights({'user': {'e': True, 'b': True}, 'item': False}, {'stat': False})
  prefix = fl.ModelWeights({'user': True, 'item': False}, False)
  predicate = lambda path: "['user']" in path
  for partition in [full, prefix, predicate, ({'user': True, 'item': False}, False)]:
    assert fl.reconstruction.resolve_partition(WEIGHTS, partition) == full
  seen = []
  fl.reconstruction.resolve_partition(WEIGHTS, lambda path: seen.append(path) or False)
  assert ".trainable['user']['e']" in seen and ".non_trainable['stat']" in seen


def test_partition_errors():
  with pytest.raises(ValueError, match='neither the tree of the weights nor a prefix'):
    fl.reconstruction.split(WEIGHTS, fl.ModelWeights({'usr': True, 'item': False}, False))
  with pytest.raises(TypeError, match=r"partition leaf .*\['item'\] is 1; expected a bool"):
    fl.reconstruction.split(WEIGHTS, fl.ModelWeights({'user': True, 'item': 1}, False))
  with pytest.raises(TypeError, match=r'returned .*expected a bool'):
    fl.reconstruction.split(WEIGHTS, lambda path: 'user')
  g, loc = fl.reconstruction.split(WEIGHTS, fl.ModelWeights(True, False))
  with pytest.raises(ValueError, match=r"\.trainable\['item'\] is set in both halves"):
    fl.reconstruction.merge(WEIGHTS, loc)
  with pytest.raises(ValueError, match='masked in both halves'):
    fl.reconstruction.merge(g, g)
  with pytest.raises(ValueError, match='expected the two halves'):
    fl.reconstruction.merge(g, {'x': 1})


def _mf_model():
  return fl.models.matrix_factorization(1, 5, 3, personal=True)


def test_reconstruction_model_variables_and_initializer():
  model = _mf_model()
  recon = fl.reconstruction.ReconstructionModel(model, lambda path: 'user' in path)
  local_names = {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(recon.local_trainable_variables)
  }
  global_names = {
    jax.tree_util.keystr(p)
    for p, _ in jax.tree_util.tree_leaves_with_path(recon.global_trainable_variables)
  }
  assert local_names == {"['user_bias']", "['user_embedding']"}
  assert global_names == {"['global_bias']", "['item_bias']", "['item_embedding']"}
  assert isinstance(recon.initial_global_weights.trainable['user_embedding'], optax.MaskedNode)
  # Default: every client starts from the model's initial locals, whatever the key.
  a = recon.initialize_local_weights(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(
    a.trainable['user_embedding'], model.initial_weights.trainable['user_embedding']
  )

  def init(key):
    w = model.initial_weights
    return w._replace(trainable={**w.trainable, 'user_embedding': jax.random.normal(key, (3,))})

  recon = fl.reconstruction.ReconstructionModel(
    model, lambda p: 'user' in p, local_initializer=init
  )
  k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
  e1 = recon.initialize_local_weights(k1).trainable['user_embedding']
  np.testing.assert_array_equal(e1, recon.initialize_local_weights(k1).trainable['user_embedding'])
  assert not np.allclose(e1, recon.initialize_local_weights(k2).trainable['user_embedding'])
  with pytest.raises(ValueError, match='local_initializer'):
    fl.reconstruction.ReconstructionModel(
      model, lambda p: 'user' in p, local_initializer=lambda key: fl.ModelWeights({}, ())
    )
  with pytest.raises(TypeError, match='FunctionalModel'):
    fl.reconstruction.ReconstructionModel(object(), True)


class _Net(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.Dense(4, name='shared')(x)
    return nn.Dense(2, name='head')(nn.relu(h))


def test_from_flax_local_submodules():
  spec = {
    'x': jax.ShapeDtypeStruct((None, 3), jnp.float32),
    'y': jax.ShapeDtypeStruct((None,), jnp.int32),
  }
  recon = fl.reconstruction.from_flax(
    _Net(), local_modules=['head'], input_spec=spec, loss_fn=fl.models.softmax_cross_entropy
  )
  paths = lambda tree: {
    jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(tree)
  }
  assert paths(recon.local_trainable_variables) == {"['head']['bias']", "['head']['kernel']"}
  assert paths(recon.global_trainable_variables) == {"['shared']['bias']", "['shared']['kernel']"}
  # Locals are re-initialized by module.init with each client's key, as a fresh Keras model.
  k1 = recon.initialize_local_weights(jax.random.PRNGKey(1)).trainable['head']['kernel']
  k2 = recon.initialize_local_weights(jax.random.PRNGKey(2)).trainable['head']['kernel']
  assert k1.shape == (4, 2) and not np.allclose(k1, k2)
  x = jnp.ones((2, 3))
  g, loc = recon.split(recon.model.initial_weights)
  np.testing.assert_allclose(
    recon.predict_on_batch(g, loc, x), recon.model.predict_on_batch(recon.model.initial_weights, x)
  )
  with pytest.raises(ValueError, match=r"local_modules \['tail'\] match no weight.*'head'"):
    fl.reconstruction.from_flax(
      _Net(), local_modules=['tail'], input_spec=spec, loss_fn=fl.models.softmax_cross_entropy
    )
  with pytest.raises(ValueError, match='non-empty list'):
    fl.reconstruction.from_flax(
      _Net(), local_modules='head', input_spec=spec, loss_fn=fl.models.softmax_cross_entropy
    )
