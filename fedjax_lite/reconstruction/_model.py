"""`ReconstructionModel`: a `FunctionalModel` whose weights are partitioned into global and local.

A partition marks every leaf of `ModelWeights(trainable, non_trainable)` local (True) or global
(False). `split(weights, partition)` returns two `ModelWeights` with the tree of `weights`: the
global half, whose local leaves are replaced by `optax.MaskedNode()`, and the local half, whose
global leaves are. `jax.tree.map` over one half therefore never sees the other half's values, and
`merge(global_weights, local_weights)` puts them back together exactly. Global leaves are
trained by federated averaging and live on the server; local leaves are rebuilt on each client
every round (Singhal et al., 2021) and never leave it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen, nnx

from fedjax_lite import models
from fedjax_lite import tree as tree_lib
from fedjax_lite.models import _flax
from fedjax_lite.templates import _client_work

Partition = Any  # a boolean pytree (a prefix of ModelWeights) or `(path: str) -> bool`


def _is_masked(x: Any) -> bool:
  return isinstance(x, optax.MaskedNode)


def _as_model_weights(tree: Any) -> Any:
  if isinstance(tree, tuple) and not isinstance(tree, models.ModelWeights) and len(tree) == 2:
    return models.ModelWeights(*tree)
  return tree


def resolve_partition(weights: models.ModelWeights, partition: Partition) -> models.ModelWeights:
  """The partition as a `ModelWeights` of Python bools with exactly the tree of `weights`.

  Args:
    weights: `ModelWeights` of arrays or `jax.ShapeDtypeStruct`s.
    partition: a pytree of bools (True = local) whose structure is `weights`' or a prefix of it
      (e.g. `ModelWeights({'user': True, 'item': False}, False)`), or a predicate called with
      each leaf's path as `jax.tree_util.keystr` writes it (e.g. `.trainable['user']['kernel']`)
      and returning a bool.

  Raises:
    ValueError: the partition's tree does not match the weights'.
    TypeError: a partition leaf (or a predicate's answer) is not a bool.
  """
  weights = _as_model_weights(weights)
  if callable(partition):
    paths, treedef = jax.tree_util.tree_flatten_with_path(weights)
    flags = []
    for path, _ in paths:
      flag = partition(jax.tree_util.keystr(path))
      if not isinstance(flag, bool | np.bool_):
        raise TypeError(
          f'partition({jax.tree_util.keystr(path)!r}) returned {flag!r}; expected a bool '
          '(True = local)'
        )
      flags.append(bool(flag))
    return treedef.unflatten(flags)
  partition = _as_model_weights(partition)
  for path, flag in jax.tree_util.tree_flatten_with_path(partition)[0]:
    if not isinstance(flag, bool | np.bool_):
      raise TypeError(
        f'partition leaf {tree_lib.keystr(path)} is {flag!r}; expected a bool (True = local)'
      )
  try:
    return jax.tree.map(
      lambda flag, subtree: jax.tree.map(lambda _: bool(flag), subtree), partition, weights
    )
  except (ValueError, TypeError) as e:
    raise ValueError(
      f'partition has tree {jax.tree.structure(partition)}, which is neither the tree of the '
      f'weights nor a prefix of it; the weights have tree {jax.tree.structure(weights)}. '
      f'({e})'
    ) from None


def split(weights: models.ModelWeights, partition: Partition) -> tuple[Any, Any]:
  """Splits `weights` into `(global_weights, local_weights)`, the inverse of `merge`.

  Both halves keep the tree of `weights`; a leaf that belongs to the other half is
  `optax.MaskedNode()` (an empty subtree, so `jax.tree.leaves` and `jax.tree.map` skip it).
  """
  weights = _as_model_weights(weights)
  flags = resolve_partition(weights, partition)

  def pick(local: bool):
    return jax.tree.map(lambda flag, w: w if flag == local else optax.MaskedNode(), flags, weights)

  return pick(False), pick(True)


def merge(global_weights: Any, local_weights: Any) -> Any:
  """The full weights from the two halves `split` made; `merge(*split(w, p)) == w`.

  Raises:
    ValueError: the halves have different trees, or a leaf is set (or masked) in both.
  """
  g_paths, g_def = jax.tree_util.tree_flatten_with_path(global_weights, is_leaf=_is_masked)
  l_leaves, l_def = jax.tree.flatten(local_weights, is_leaf=_is_masked)
  if g_def != l_def:
    raise ValueError(
      f'global_weights has tree {g_def} but local_weights has tree {l_def}; expected the two '
      'halves split() returns'
    )
  merged = []
  for (path, g), loc in zip(g_paths, l_leaves, strict=True):
    if _is_masked(g) == _is_masked(loc):
      which = 'masked in both halves' if _is_masked(g) else 'set in both halves'
      raise ValueError(
        f'leaf {tree_lib.keystr(path)} is {which}; expected exactly one half to hold it'
      )
    merged.append(loc if _is_masked(g) else g)
  return g_def.unflatten(merged)


def _check_initializer(local_initializer, initial_weights) -> None:
  if not callable(local_initializer):
    raise TypeError(
      f'local_initializer must be None or a callable (key) -> ModelWeights; got '
      f'{type(local_initializer).__name__}'
    )
  got = jax.eval_shape(local_initializer, jax.random.PRNGKey(0))
  mismatch = tree_lib.tree_spec_mismatch(tree_lib.tree_specs(initial_weights), got)
  if mismatch is not None:
    raise ValueError(
      f'local_initializer(key) must return ModelWeights like model.initial_weights: {mismatch}'
    )


class ReconstructionModel:
  """A `FunctionalModel` plus a partition of its weights into global and local parts.

  After TFF's `tff.learning.models.ReconstructionModel`. Global leaves are aggregated on the
  server; local leaves are initialized on each client every round by `initialize_local_weights`
  (a pure function of a key, so a client starts where a fresh `model_fn()` would in TFF),
  reconstructed there, and never leave it.

  Example:
    >>> model = fl.models.matrix_factorization(1, num_items, 50, personal=True)
    >>> recon = fl.reconstruction.ReconstructionModel(model, lambda path: 'user' in path)
    >>> recon.local_trainable_variables  # {'user_embedding': [50], 'user_bias': [], ...masked}

  Args:
    model: the `FunctionalModel` with all weights.
    partition: True = local, as a pytree of bools (the tree of `model.initial_weights` or a
      prefix) or a predicate of a leaf's `jax.tree_util.keystr` path (see `resolve_partition`).
    local_initializer: optional `(key) -> ModelWeights` like `model.initial_weights`; only its
      local leaves are used (under `jit` the rest is never computed). Default: every client
      starts from the local leaves of `model.initial_weights`.
  """

  def __init__(
    self,
    model: models.FunctionalModel,
    partition: Partition,
    *,
    local_initializer: Callable[[jax.Array], models.ModelWeights] | None = None,
  ):
    _client_work.check_model(model)
    self._model = model
    self._partition = resolve_partition(model.initial_weights, partition)
    self._global, self._local = split(model.initial_weights, self._partition)
    if local_initializer is not None:
      _check_initializer(local_initializer, model.initial_weights)
    self._local_initializer = local_initializer

  @property
  def model(self) -> models.FunctionalModel:
    return self._model

  @property
  def partition(self) -> models.ModelWeights:
    """`ModelWeights` of bools, True for local leaves."""
    return self._partition

  @property
  def input_spec(self) -> Any:
    return self._model.input_spec

  @property
  def initial_global_weights(self) -> models.ModelWeights:
    """The global half of the initial weights (local leaves masked): the server's model."""
    return self._global

  @property
  def global_trainable_variables(self) -> Any:
    return self._global.trainable

  @property
  def global_non_trainable_variables(self) -> Any:
    return self._global.non_trainable

  @property
  def local_trainable_variables(self) -> Any:
    return self._local.trainable

  @property
  def local_non_trainable_variables(self) -> Any:
    return self._local.non_trainable

  def split(self, weights: models.ModelWeights) -> tuple[Any, Any]:
    """`(global_weights, local_weights)` of full `weights` under this model's partition."""
    return split(weights, self._partition)

  def merge(self, global_weights: Any, local_weights: Any) -> models.ModelWeights:
    return merge(global_weights, local_weights)

  def initialize_local_weights(self, key: jax.Array) -> Any:
    """A client's starting local half (global leaves masked), a pure function of `key`."""
    if self._local_initializer is None:
      return self._local
    return self.split(self._local_initializer(key))[1]

  def predict_on_batch(
    self, global_weights: Any, local_weights: Any, x: Any, training: bool = True, rng=None
  ) -> Any:
    """Predictions `[batch_size, ...]` of the merged weights."""
    return self._model.predict_on_batch(merge(global_weights, local_weights), x, training, rng)

  def forward_pass(
    self, global_weights: Any, local_weights: Any, batch: Any, training: bool = True, rng=None
  ) -> models.BatchOutput:
    """`BatchOutput` of one unpadded batch with the merged weights."""
    return self._model.forward_pass(merge(global_weights, local_weights), batch, training, rng)


def _module_partition(local_modules: Sequence[str]) -> Callable[[tuple], bool]:
  names = set(local_modules)

  def is_local(path: tuple) -> bool:
    return any(getattr(key, 'key', None) in names for key in path)

  return is_local


def from_flax(
  module: linen.Module | nnx.Module,
  *,
  local_modules: Sequence[str],
  input_spec: Any,
  loss_fn: Callable,
  metrics_fns: tuple[Callable, Callable, Callable] | None = None,
  seed: int = 0,
  training_arg: str | None = None,
) -> ReconstructionModel:
  """A `ReconstructionModel` from a flax module whose named submodules are local.

  A leaf is local when any key on its path names one of `local_modules` (a linen submodule's
  name, e.g. `'UserEmbedding'` or `'Dense_1'`, or an nnx attribute name), in every collection.
  linen: each client initializes its local leaves with `module.init(key, ...)`, a fresh key per
  client and round, as a fresh Keras model in TFF would; nnx: from the module's current values.

  Example:
    >>> recon = fl.reconstruction.from_flax(
    ...     Net(), local_modules=['head'], input_spec=spec, loss_fn=fl.models.mean_squared_error)

  Args:
    module: an unbound `linen.Module` or an `nnx.Module` instance.
    local_modules: names of the submodules whose weights are local; each must name some leaf.
    input_spec, loss_fn, metrics_fns, seed, training_arg: as `fl.models.from_flax`.

  Raises:
    ValueError: `local_modules` is empty, or one of its names matches no weight.
  """
  if isinstance(local_modules, str) or not local_modules:
    raise ValueError(
      f'local_modules must be a non-empty list of submodule names; got {local_modules!r}'
    )
  model = models.from_flax(
    module,
    input_spec=input_spec,
    loss_fn=loss_fn,
    metrics_fns=metrics_fns,
    seed=seed,
    training_arg=training_arg,
  )
  paths = [path for path, _ in jax.tree_util.tree_flatten_with_path(model.initial_weights)[0]]
  found = {getattr(key, 'key', None) for path in paths for key in path}
  missing = [name for name in local_modules if name not in found]
  if missing:
    submodules = sorted(str(k) for k in found if isinstance(k, str))
    raise ValueError(
      f'local_modules {missing} match no weight of the module; its weights are under the '
      f'names {submodules}'
    )
  is_local = _module_partition(local_modules)
  treedef = jax.tree.structure(model.initial_weights)
  partition = treedef.unflatten([is_local(path) for path in paths])
  local_initializer = None
  if isinstance(module, linen.Module):
    kwargs = {} if training_arg is None else {training_arg: False}
    example = _flax._example_input(input_spec)

    def local_initializer(key):
      variables = dict(module.init(key, example, **kwargs))
      trainable = variables.pop('params', {})
      weights = models.ModelWeights(trainable, variables)
      return jax.tree.map(jnp.asarray, weights)

  return ReconstructionModel(model, partition, local_initializer=local_initializer)
