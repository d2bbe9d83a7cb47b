"""Optimizer builders whose hyperparameters live in their state, and `get_hparams`/`set_hparams`.

Each builder returns an `optax.GradientTransformation` wrapped by `optax.inject_hyperparams`, so
its numeric hyperparameters are arrays in the optimizer state: changing a learning rate between
rounds changes an input of the compiled round, not the program. Builders carry
`tff.learning.optimizers`' names and follow its math (`_tff_rules`) and its defaults;
hyperparameter names are optax's. Any plain optax transformation is accepted wherever a
builder's is, with optax's math.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite.optimizers import _tff_rules


def check_non_negative(name: str, value: Any) -> None:
  """Raises ValueError naming `name` unless `value` is a finite number >= 0."""
  if not isinstance(value, int | float | np.number) or not (np.isfinite(value) and value >= 0):
    raise ValueError(f'{name} must be a finite number >= 0; got {value!r}')


def _check_non_negative(**values: float | None) -> None:
  """Checks numbers; a callable (an optax schedule of the step count) is taken as it is."""
  for name, value in values.items():
    if value is not None and not callable(value):
      check_non_negative(name, value)


def _check_decay(**values: float) -> None:
  for name, value in values.items():
    if not 0 <= value < 1:
      raise ValueError(f'{name} must be in [0, 1); got {value!r}')


def build_sgdm(learning_rate: float = 0.01, momentum: float | None = None, nesterov: bool = False):
  """SGD, with heavy-ball momentum when `momentum` is given (`tff.learning.optimizers.build_sgdm`,
  same defaults).

  `v ← momentum·v + g` from 0, then `w ← w − lr·v`, or `w ← w − lr·(g + momentum·v)` with
  `nesterov` (TFF's and `optax.sgd`'s rules agree). Hparams: learning_rate[, momentum];
  `nesterov` is static.
  """
  _check_non_negative(learning_rate=learning_rate, momentum=momentum)
  if momentum is not None:
    _check_decay(momentum=momentum)
  if not isinstance(nesterov, bool):
    raise TypeError(f'nesterov must be a bool; got {nesterov!r}')
  if momentum is None:
    if nesterov:
      raise ValueError('nesterov=True needs a momentum; got momentum=None')
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
  return optax.inject_hyperparams(optax.sgd, static_args=('nesterov',))(
    learning_rate=learning_rate, momentum=momentum, nesterov=nesterov
  )


def build_adam(learning_rate: float = 0.001, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
  """Adam (Kingma & Ba, 2015) with TFF's update rule and defaults
  (`tff.learning.optimizers.build_adam`; TFF has no default learning rate).

  `m ← b1·m + (1−b1)·g`, `v ← b2·v + (1−b2)·g²` (both from 0), then
  `w ← w − lr·√(1−b2ᵗ)/(1−b1ᵗ) · m/(√v + eps)`: eps is added to the uncorrected `√v`, where
  `optax.adam` adds it to the corrected one. Hparams: learning_rate, b1, b2, eps.
  """
  _check_non_negative(learning_rate=learning_rate, eps=eps)
  _check_decay(b1=b1, b2=b2)
  return optax.inject_hyperparams(_tff_rules.adam)(
    learning_rate=learning_rate, b1=b1, b2=b2, eps=eps
  )


def build_adagrad(
  learning_rate: float = 0.01, initial_accumulator_value: float = 0.1, eps: float = 1e-7
):
  """Adagrad (Duchi et al., 2011) with TFF's update rule and defaults (`build_adagrad`; TFF
  has no default learning rate).

  `s ← s + g²` from `initial_accumulator_value` (TFF's `initial_preconditioner_value`), then
  `w ← w − lr·g/√(s + eps)`. Hparams: learning_rate, eps; `initial_accumulator_value` only
  seeds the state, so it is static.
  """
  _check_non_negative(
    learning_rate=learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps
  )
  return optax.inject_hyperparams(_tff_rules.adagrad, static_args=('initial_accumulator_value',))(
    learning_rate=learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps
  )


def build_rmsprop(learning_rate: float = 0.01, decay: float = 0.9, eps: float = 1e-7):
  """RMSprop (Tieleman & Hinton, 2012) with TFF's update rule and defaults (`build_rmsprop`;
  TFF has no default learning rate).

  `s ← decay·s + (1−decay)·g²` from 0, then `w ← w − lr·g/(√s + eps)` (`optax.rmsprop` divides
  by `√(s + eps)`). Hparams: learning_rate, decay, eps.
  """
  _check_non_negative(learning_rate=learning_rate, eps=eps)
  _check_decay(decay=decay)
  return optax.inject_hyperparams(_tff_rules.rmsprop)(
    learning_rate=learning_rate, decay=decay, eps=eps
  )


def build_yogi(
  learning_rate: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-3,
  initial_accumulator_value: float = 1e-6,
):
  """Yogi (Zaheer et al., 2018) with TFF's update rule and defaults (`build_yogi`; TFF has no
  default learning rate). `fl.algorithms.build_fed_yogi` puts it on the server with Reddi et
  al.'s (2021) settings instead.

  `m ← b1·m + (1−b1)·g` from 0, `v ← v + (1−b2)·sign(g² − v)·g²` from
  `initial_accumulator_value` (TFF's `initial_preconditioner_value`), then Adam's step
  `w ← w − lr·√(1−b2ᵗ)/(1−b1ᵗ) · m/(√v + eps)`. Hparams: learning_rate, b1, b2, eps.
  """
  _check_non_negative(
    learning_rate=learning_rate, eps=eps, initial_accumulator_value=initial_accumulator_value
  )
  _check_decay(b1=b1, b2=b2)
  return optax.inject_hyperparams(_tff_rules.yogi, static_args=('initial_accumulator_value',))(
    learning_rate=learning_rate,
    b1=b1,
    b2=b2,
    eps=eps,
    initial_accumulator_value=initial_accumulator_value,
  )


_INJECTED = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)
# Hyperparameters that are decay rates: in [0, 1). Every hyperparameter is finite and >= 0.
_DECAYS = ('b1', 'b2', 'decay', 'momentum')


def _is_injected(node: Any) -> bool:
  return isinstance(node, _INJECTED)


def _scheduled(node: Any) -> set[str]:
  """Names of an injected state's hyperparameters that follow a schedule (given as callables)."""
  return set(getattr(node, 'hyperparams_states', None) or ())


def get_hparams(opt_state: Any) -> dict[str, Any]:
  """The hyperparameters held in an optimizer state, wherever `inject_hyperparams` put them
  (e.g. inside `optax.chain(..., build_sgdm(0.1))`); `{}` for a plain optax transformation.

  A hyperparameter given as a schedule (a callable of the step count) is recomputed at every
  step, so it is not one that `set_hparams` can set and is left out.

  Raises:
    ValueError: two injected states in the chain hold hyperparameters of the same name.
  """
  found: dict[str, Any] = {}
  for node in jax.tree.leaves(opt_state, is_leaf=_is_injected):
    if not _is_injected(node):
      continue
    clash = sorted(set(found) & set(node.hyperparams))
    if clash:
      raise ValueError(
        f'the optimizer holds hyperparameters {clash} twice (two injected transformations in '
        'one chain); give them distinct names to set them'
      )
    scheduled = _scheduled(node)
    found.update({k: v for k, v in node.hyperparams.items() if k not in scheduled})
  return found


def replace_hparams(current: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
  """`current` with some or all values replaced, each cast to the dtype and shape it had.

  Nested mappings (e.g. one per optimizer) are replaced key by key in the same way.

  Raises:
    ValueError: a key is not in `current`, or a value has the wrong shape.
  """
  unknown = sorted(set(hparams) - set(current))
  if unknown:
    raise ValueError(
      f'hparams has unknown keys {unknown}; expected some of {sorted(current) or "none"}. '
      'Tip: a hyperparameter that follows a schedule (given as a callable) is not held in the '
      'state, so it cannot be set.'
    )
  new = dict(current)
  for name, value in hparams.items():
    if isinstance(current[name], Mapping):
      if not isinstance(value, Mapping):
        raise TypeError(f"hparams['{name}'] must be a mapping like {sorted(current[name])}")
      new[name] = replace_hparams(current[name], value)
      continue
    old = jnp.asarray(current[name])
    try:
      value = jnp.asarray(value, dtype=old.dtype)
    except (TypeError, ValueError) as e:
      raise TypeError(f"hparams['{name}'] must be a number like {old.dtype}; got {value!r}") from e
    if value.shape != old.shape:
      raise ValueError(f"hparams['{name}'] has shape {value.shape}; expected {old.shape}")
    _check_hparam_value(name, value)
    new[name] = value
  return new


def _check_hparam_value(name: str, value: jax.Array) -> None:
  """Raises for a value the builders would reject: non-finite, negative, a decay of 1 or more.
  Values being traced (inside a compiled round) were checked when they were set."""
  if isinstance(value, jax.core.Tracer) or not jnp.issubdtype(value.dtype, jnp.floating):
    return
  number = np.asarray(value)
  if not (np.all(np.isfinite(number)) and np.all(number >= 0)):
    raise ValueError(f"hparams['{name}'] must be a finite number >= 0; got {number}")
  if name in _DECAYS and not np.all(number < 1):
    raise ValueError(f"hparams['{name}'] is a decay rate and must be in [0, 1); got {number}")


def set_hparams(opt_state: Any, hparams: Mapping[str, Any]) -> Any:
  """A copy of `opt_state` with some or all hyperparameters replaced.

  Values are cast to the dtype and shape already in the state, so the compiled round that takes
  the state is reused, not retraced.

  Raises:
    ValueError: a key is not a hyperparameter of this optimizer, follows a schedule, or a value
      has the wrong shape.
  """
  injected = [n for n in jax.tree.leaves(opt_state, is_leaf=_is_injected) if _is_injected(n)]
  scheduled = sorted(set(hparams) & set().union(*map(_scheduled, injected)))
  if scheduled:
    raise ValueError(
      f'hparams {scheduled} follow a schedule given to the optimizer (a callable), which sets '
      'them at every step; set_hparams cannot change them. Tip: give the optimizer a number to '
      'set it between rounds, or a schedule over rounds with '
      'fl.algorithms.build_weighted_fed_avg_with_optimizer_schedule.'
    )
  new = replace_hparams(get_hparams(opt_state), hparams)
  if not new:
    return opt_state

  def replace(node):
    if not _is_injected(node):
      return node
    return node._replace(hyperparams={k: new.get(k, v) for k, v in node.hyperparams.items()})

  return jax.tree.map(replace, opt_state, is_leaf=_is_injected)
