"""`tff.learning.optimizers`' update rules as optax `GradientTransformation`s.

TFF's adaptive optimizers differ from optax's in their initial accumulators and in where epsilon
goes (e.g. TFF's Adam adds it to the uncorrected `√v`), so each rule is written out here. Every
transformation returns the whole update, learning rate included, and takes its hyperparameters
as arguments, so `optax.inject_hyperparams` can hold them in the state.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax


class MomentsState(NamedTuple):
  """State of TFF's Adam and Yogi.

  Attributes:
    count: `[] int32` steps taken (TFF's `step`).
    mu: first moment, like the params (TFF's `accumulator`).
    nu: second moment, like the params (TFF's `preconditioner`).
  """

  count: jax.Array
  mu: Any
  nu: Any


class PreconditionerState(NamedTuple):
  """State of TFF's Adagrad and RMSprop: `nu`, like the params (TFF's `preconditioner`)."""

  nu: Any


def _full(params: Any, value: float) -> Any:
  return jax.tree.map(lambda p: jnp.full_like(p, value), params)


def _bias_corrected(
  learning_rate, b1, b2, eps, initial_nu: float, nu_update: Callable
) -> optax.GradientTransformation:
  """`mu ← mu + (1−b1)(g − mu)`, `nu ← nu_update(nu, g, b2)`, then
  `Δw = −lr·√(1−b2ᵗ)/(1−b1ᵗ) · mu/(√nu + eps)`."""

  def init(params):
    return MomentsState(jnp.zeros([], jnp.int32), _full(params, 0.0), _full(params, initial_nu))

  def update(grads, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: m + (g - m) * (1 - b1), state.mu, grads)
    nu = jax.tree.map(lambda v, g: nu_update(v, g, b2), state.nu, grads)
    count = optax.safe_increment(state.count)
    t = count.astype(jnp.float32)
    step = learning_rate * jnp.sqrt(1 - b2**t) / (1 - b1**t)
    updates = jax.tree.map(lambda m, v: (-step * m / (jnp.sqrt(v) + eps)).astype(m.dtype), mu, nu)
    return updates, MomentsState(count, mu, nu)

  return optax.GradientTransformation(init, update)


def adam(learning_rate, b1, b2, eps) -> optax.GradientTransformation:
  """TFF's Adam: both moments start at 0, `nu ← nu + (1−b2)(g² − nu)`."""
  return _bias_corrected(
    learning_rate, b1, b2, eps, 0.0, lambda v, g, b2: v + (g * g - v) * (1 - b2)
  )


def yogi(learning_rate, b1, b2, eps, initial_accumulator_value) -> optax.GradientTransformation:
  """TFF's Yogi: `mu` starts at 0 and `nu` at `initial_accumulator_value`;
  `nu ← nu + (1−b2)·sign(g² − nu)·g²`."""
  return _bias_corrected(
    learning_rate,
    b1,
    b2,
    eps,
    initial_accumulator_value,
    lambda v, g, b2: v + (1 - b2) * jnp.sign(g * g - v) * g * g,
  )


def _preconditioned(
  initial_nu: float, nu_update: Callable, scale: Callable
) -> optax.GradientTransformation:
  """`nu ← nu_update(nu, g)`, `Δw = scale(g, nu)`."""

  def init(params):
    return PreconditionerState(_full(params, initial_nu))

  def update(grads, state, params=None):
    del params
    nu = jax.tree.map(nu_update, state.nu, grads)
    updates = jax.tree.map(lambda g, v: scale(g, v).astype(g.dtype), grads, nu)
    return updates, PreconditionerState(nu)

  return optax.GradientTransformation(init, update)


def adagrad(learning_rate, eps, initial_accumulator_value) -> optax.GradientTransformation:
  """TFF's Adagrad: `nu` starts at `initial_accumulator_value`, `nu ← nu + g²`,
  `Δw = −lr·g/√(nu + eps)`."""
  return _preconditioned(
    initial_accumulator_value,
    lambda v, g: v + g * g,
    lambda g, v: -learning_rate * g / jnp.sqrt(v + eps),
  )


def rmsprop(learning_rate, decay, eps) -> optax.GradientTransformation:
  """TFF's RMSprop: `nu` starts at 0, `nu ← nu + (1−decay)(g² − nu)`, `Δw = −lr·g/(√nu + eps)`."""
  return _preconditioned(
    0.0,
    lambda v, g: v + (g * g - v) * (1 - decay),
    lambda g, v: -learning_rate * g / (jnp.sqrt(v) + eps),
  )
