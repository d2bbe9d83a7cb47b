"""`from_variable_model`: TFF's reconstruction variable model
(`tff.learning.models.ReconstructionModel` over variables) from an nnx module.

The module follows `fl.models.from_variable_model`'s protocol; an nnx filter marks which weight
variables are local to each client (rebuilt every round, never sent to the server).
"""

from __future__ import annotations

from typing import Any

from flax import nnx, traverse_util

from fedjax_lite import models
from fedjax_lite.reconstruction import _model


def from_variable_model(module: nnx.Module, *, local: Any) -> _model.ReconstructionModel:
  """A `ReconstructionModel` from a variable-model nnx module whose `local` weights stay on the
  client.

  The four groups are TFF's: `global_trainable_variables` (`nnx.Param`s not matched by `local`),
  `global_non_trainable_variables` (other weights not matched), `local_trainable_variables` and
  `local_non_trainable_variables` (those matched); `fl.models.LocalVariable`s are metric
  accumulators, in none of them. Every client starts its local weights from the module's values
  and its local variables from their initial values (as `fl.models.from_variable_model`).

  Example:
    >>> class UserParam(nnx.Param):  # a local trainable weight
    ...   pass
    >>> recon = fl.reconstruction.from_variable_model(Model(), local=UserParam)
    >>> recon = fl.reconstruction.from_variable_model(Model(), local=nnx.PathContains('user'))

  Args:
    module: an nnx module following `fl.models.from_variable_model`'s protocol.
    local: an nnx filter of the local weights: a variable type (or a tuple of them), a
      `nnx.PathContains`, or a predicate `(path, variable) -> bool`.

  Raises:
    ValueError: `local` matches no weight of the module; or `fl.models.from_variable_model`
      refuses the module (e.g. a BatchNorm that training updates).
  """
  model = models.from_variable_model(module)
  local_weights = nnx.state(module, nnx.All(nnx.Not(models.LocalVariable), local))
  local_paths = set(traverse_util.flatten_dict(nnx.to_pure_dict(local_weights)))
  if not local_paths:
    raise ValueError(
      f'local={local!r} matches no weight of {type(module).__name__}. Tip: mark local weights '
      "with a variable type (class UserParam(nnx.Param)), or a path (nnx.PathContains('user'))."
    )

  def flags(weights):
    flat = traverse_util.flatten_dict(weights)
    return traverse_util.unflatten_dict({path: path in local_paths for path in flat})

  weights = model.initial_weights
  partition = models.ModelWeights(flags(weights.trainable), flags(weights.non_trainable))
  return _model.ReconstructionModel(model, partition)
