"""Optimizer builders whose hyperparameters live in their state, and `get_hparams`/`set_hparams`.

Each builder returns an `optax.GradientTransformation` wrapped by `optax.inject_hyperparams`, so
its numeric hyperparameters are arrays in the optimizer state: changing a learning rate between
rounds changes an input of the compiled round, not the program. Names are optax's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
import optax


def _check_non_negative(**values: float | None) -> None:
  """Checks numbers; a callable (an optax schedule of the step count) is taken as it is."""
  for name, value in values.items():
    if value is None or callable(value):
      continue
    if not isinstance(value, int | float | np.number) or not (np.isfinite(value) and value >= 0):
      raise ValueError(f'{name} must be a finite number >= 0; got {value!r}')


def _check_decay(**values: float) -> None:
  for name, value in values.items():
    if not 0 <= value < 1:
      raise ValueError(f'{name} must be in [0, 1); got {value!r}')


def build_sgdm(learning_rate: float = 0.01, momentum: float | None = None):
  """SGD, with heavy-ball momentum when `momentum` is given (hparams: learning_rate[, momentum])."""
  _check_non_negative(learning_rate=learning_rate, momentum=momentum)
  if momentum is not None:
    _check_decay(momentum=momentum)
  if momentum is None:
    return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate)
  return optax.inject_hyperparams(optax.sgd)(learning_rate=learning_rate, momentum=momentum)


def build_adam(learning_rate: float = 0.001, b1: float = 0.9, b2: float = 0.999, eps: float = 1e-7):
  """Adam (Kingma & Ba, 2015)."""
  _check_non_negative(learning_rate=learning_rate, eps=eps)
  _check_decay(b1=b1, b2=b2)
  return optax.inject_hyperparams(optax.adam)(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def build_adagrad(
  learning_rate: float = 0.01, initial_accumulator_value: float = 0.1, eps: float = 1e-7
):
  """Adagrad (Duchi et al., 2011)."""
  _check_non_negative(
    learning_rate=learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps
  )
  # initial_accumulator_value only seeds the state at init: static, not a hyperparameter.
  return optax.inject_hyperparams(optax.adagrad, static_args=('initial_accumulator_value',))(
    learning_rate=learning_rate, initial_accumulator_value=initial_accumulator_value, eps=eps
  )


def build_rmsprop(learning_rate: float = 0.01, decay: float = 0.9, eps: float = 1e-7):
  """RMSProp (Hinton's lecture 6e)."""
  _check_non_negative(learning_rate=learning_rate, eps=eps)
  _check_decay(decay=decay)
  # initial_scale only seeds the state at init: static, so it is not offered as a hyperparameter.
  return optax.inject_hyperparams(optax.rmsprop, static_args=('initial_scale',))(
    learning_rate=learning_rate, decay=decay, eps=eps
  )


def build_yogi(
  learning_rate: float = 0.01,
  b1: float = 0.9,
  b2: float = 0.999,
  eps: float = 1e-3,
):
  """Yogi (Zaheer et al., 2018), the server optimizer of Reddi et al.'s adaptive FL."""
  _check_non_negative(learning_rate=learning_rate, eps=eps)
  _check_decay(b1=b1, b2=b2)
  return optax.inject_hyperparams(optax.yogi)(learning_rate=learning_rate, b1=b1, b2=b2, eps=eps)


def get_hparams(opt_state: Any) -> dict[str, Any]:
  """The hyperparameters held in an optimizer state; `{}` for a plain optax transformation."""
  if isinstance(opt_state, optax.InjectHyperparamsState | optax.InjectStatefulHyperparamsState):
    return dict(opt_state.hyperparams)
  return {}


def replace_hparams(current: Mapping[str, Any], hparams: Mapping[str, Any]) -> dict[str, Any]:
  """`current` with some or all values replaced, each cast to the dtype and shape it had.

  Nested mappings (e.g. one per optimizer) are replaced key by key in the same way.

  Raises:
    ValueError: a key is not in `current`, or a value has the wrong shape.
  """
  unknown = sorted(set(hparams) - set(current))
  if unknown:
    raise ValueError(
      f'hparams has unknown keys {unknown}; expected some of {sorted(current) or "none"}'
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
    new[name] = value
  return new


def set_hparams(opt_state: Any, hparams: Mapping[str, Any]) -> Any:
  """A copy of `opt_state` with some or all hyperparameters replaced.

  Values are cast to the dtype and shape already in the state, so the compiled round that takes
  the state is reused, not retraced.

  Raises:
    ValueError: a key is not a hyperparameter of this optimizer, or a value has the wrong shape.
  """
  new = replace_hparams(get_hparams(opt_state), hparams)
  return opt_state._replace(hyperparams=new) if new else opt_state
