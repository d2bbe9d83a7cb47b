"""Optimizer builders: hyperparameters in state, get/set_hparams, equality with plain optax."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from fedjax_lite import optimizers

PARAMS = {'w': np.array([[0.5, -1.0], [2.0, 0.25]], np.float32), 'b': np.array([0.1], np.float32)}
GRADS = [
  jax.tree.map(
    lambda p, i=i: np.cos(np.arange(p.size) + i).reshape(p.shape).astype(np.float32), PARAMS
  )
  for i in range(3)
]

# (name, builder kwargs, plain optax optimizer with the same hyperparameters)
CASES = [
  ('sgd', dict(learning_rate=0.3), lambda h: optax.sgd(**h)),
  ('sgdm', dict(learning_rate=0.3, momentum=0.8), lambda h: optax.sgd(**h)),
  ('adam', dict(learning_rate=0.02, b1=0.8, b2=0.95, eps=1e-6), lambda h: optax.adam(**h)),
  (
    'adagrad',
    dict(learning_rate=0.2, initial_accumulator_value=0.3, eps=1e-6),
    lambda h: optax.adagrad(**h),
  ),
  ('rmsprop', dict(learning_rate=0.05, decay=0.8, eps=1e-5), lambda h: optax.rmsprop(**h)),
  ('yogi', dict(learning_rate=0.04, b1=0.85, b2=0.99, eps=1e-2), lambda h: optax.yogi(**h)),
]
BUILDERS = {
  'sgd': optimizers.build_sgdm,
  'sgdm': optimizers.build_sgdm,
  'adam': optimizers.build_adam,
  'adagrad': optimizers.build_adagrad,
  'rmsprop': optimizers.build_rmsprop,
  'yogi': optimizers.build_yogi,
}
IDS = [c[0] for c in CASES]


def run_updates(optimizer, state, grads=GRADS):
  """The updates of successive steps, applying each to the params."""
  params = PARAMS
  updates_seen = []
  for g in grads:
    updates, state = optimizer.update(g, state, params)
    params = optax.apply_updates(params, updates)
    updates_seen.append(updates)
  return updates_seen, state


def assert_trees_close(a, b, rtol=1e-6, atol=1e-7):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


# Arguments that only seed the state at init are static, not hyperparameters.
STATIC_ARGS = {'adagrad': {'initial_accumulator_value'}}


@pytest.mark.parametrize('name, kwargs, plain', CASES, ids=IDS)
def test_hyperparameters_live_in_state(name, kwargs, plain):
  del plain
  optimizer = BUILDERS[name](**kwargs)
  hparams = optimizers.get_hparams(optimizer.init(PARAMS))
  expected = set(kwargs) - STATIC_ARGS.get(name, set())
  assert expected <= set(hparams)
  assert not STATIC_ARGS.get(name, set()) & set(hparams)
  for key in expected:
    assert isinstance(hparams[key], jax.Array)
    assert hparams[key].dtype == jnp.float32 and hparams[key].shape == ()
    assert not hparams[key].weak_type
    np.testing.assert_allclose(hparams[key], kwargs[key], rtol=1e-6)


def test_sgdm_without_momentum_has_only_a_learning_rate():
  hparams = optimizers.get_hparams(optimizers.build_sgdm(0.1).init(PARAMS))
  assert set(hparams) == {'learning_rate'}


@pytest.mark.parametrize('name, kwargs, plain', CASES, ids=IDS)
def test_update_equals_plain_optax(name, kwargs, plain):
  optimizer = BUILDERS[name](**kwargs)
  reference = plain(kwargs)
  ours, _ = run_updates(optimizer, optimizer.init(PARAMS))
  theirs, _ = run_updates(reference, reference.init(PARAMS))
  assert_trees_close(ours, theirs)


@pytest.mark.parametrize('name, kwargs, plain', CASES, ids=IDS)
def test_set_hparams_changes_the_update_like_a_fresh_optax(name, kwargs, plain):
  optimizer = BUILDERS[name](**kwargs)
  new = {'learning_rate': kwargs['learning_rate'] * 3}
  if 'momentum' in kwargs:
    new['momentum'] = 0.5
  state = optimizers.set_hparams(optimizer.init(PARAMS), new)

  for key, value in new.items():
    np.testing.assert_allclose(optimizers.get_hparams(state)[key], value, rtol=1e-6)
  reference = plain({**kwargs, **new})
  ours, _ = run_updates(optimizer, state)
  theirs, _ = run_updates(reference, reference.init(PARAMS))
  assert_trees_close(ours, theirs)


@pytest.mark.parametrize('name, kwargs, plain', CASES, ids=IDS)
def test_get_set_round_trip(name, kwargs, plain):
  del plain
  state = BUILDERS[name](**kwargs).init(PARAMS)
  hparams = optimizers.get_hparams(state)
  again = optimizers.set_hparams(state, hparams)
  assert jax.tree.structure(again) == jax.tree.structure(state)
  assert_trees_close(optimizers.get_hparams(again), hparams, rtol=0, atol=0)
  # A partial set changes only what it names.
  partial = optimizers.set_hparams(state, {'learning_rate': 0.125})
  for key, value in optimizers.get_hparams(partial).items():
    expected = 0.125 if key == 'learning_rate' else hparams[key]
    np.testing.assert_array_equal(value, expected)
  # get_hparams hands out a copy: changing it does not change the state.
  hparams['learning_rate'] = jnp.float32(99.0)
  assert float(optimizers.get_hparams(state)['learning_rate']) == pytest.approx(
    kwargs['learning_rate']
  )


@pytest.mark.parametrize(
  'value',
  [1, 0.25, np.float64(0.25), np.array(0.25), jnp.asarray(0.25), jnp.asarray(1, jnp.int32)],
  ids=['int', 'float', 'np_float64', 'np_0d', 'jax_weak', 'jax_int32'],
)
def test_set_hparams_keeps_strong_float32(value):
  state = optimizers.build_adam(0.01).init(PARAMS)
  lr = optimizers.get_hparams(optimizers.set_hparams(state, {'learning_rate': value}))[
    'learning_rate'
  ]
  assert isinstance(lr, jax.Array)
  assert lr.dtype == jnp.float32
  assert not lr.weak_type
  np.testing.assert_allclose(lr, float(np.asarray(value)), rtol=1e-6)


def test_set_hparams_does_not_retrace_the_step():
  optimizer = optimizers.build_sgdm(0.1, momentum=0.9)
  traces = []

  @jax.jit
  def step(state, grads):
    traces.append(1)
    return optimizer.update(grads, state, PARAMS)

  state = optimizer.init(PARAMS)
  for lr in (0.1, 0.2, 3):
    state = optimizers.set_hparams(state, {'learning_rate': lr, 'momentum': 0.5})
    _, state = step(state, GRADS[0])
  assert len(traces) == 1


def test_set_hparams_rejects_unknown_keys():
  state = optimizers.build_sgdm(0.1).init(PARAMS)
  with pytest.raises(
    ValueError, match=r"unknown keys \['lr'\]; expected some of \['learning_rate'\]"
  ):
    optimizers.set_hparams(state, {'lr': 0.1})
  with pytest.raises(ValueError, match=r"unknown keys \['momentum'\]"):
    optimizers.set_hparams(state, {'learning_rate': 0.1, 'momentum': 0.9})


@pytest.mark.parametrize('value', [np.ones(2), np.ones((1,)), [0.1, 0.2]], ids=['2', '1', 'list'])
def test_set_hparams_rejects_wrong_shapes(value):
  state = optimizers.build_adam(0.01).init(PARAMS)
  shape = np.shape(value)
  with pytest.raises(
    ValueError, match=rf"hparams\['learning_rate'\] has shape \({shape[0]},\); expected \(\)"
  ):
    optimizers.set_hparams(state, {'learning_rate': value})


def test_plain_optax_optimizer_is_accepted():
  optimizer = optax.sgd(0.1, momentum=0.9)
  state = optimizer.init(PARAMS)
  assert optimizers.get_hparams(state) == {}
  assert optimizers.set_hparams(state, {}) is state
  with pytest.raises(ValueError, match="unknown keys \\['learning_rate'\\]; expected some of none"):
    optimizers.set_hparams(state, {'learning_rate': 0.2})


def test_user_injected_hyperparams_are_found():
  optimizer = optax.inject_hyperparams(optax.adamw)(learning_rate=0.1, weight_decay=0.01)
  state = optimizer.init(PARAMS)
  hparams = optimizers.get_hparams(state)
  assert {'learning_rate', 'weight_decay'} <= set(hparams)
  state = optimizers.set_hparams(state, {'weight_decay': 0.5})
  np.testing.assert_allclose(optimizers.get_hparams(state)['weight_decay'], 0.5)


def test_sgdm_matches_numpy_heavy_ball():
  lr, momentum = 0.3, 0.8
  ours, _ = run_updates(
    optimizers.build_sgdm(lr, momentum), optimizers.build_sgdm(lr, momentum).init(PARAMS)
  )
  trace = {k: np.zeros_like(v, np.float64) for k, v in PARAMS.items()}
  for g, u in zip(GRADS, ours, strict=True):
    for k in PARAMS:
      trace[k] = g[k] + momentum * trace[k]
      np.testing.assert_allclose(u[k], -lr * trace[k], rtol=1e-6)


NON_NEGATIVE = 'must be a finite number >= 0'
DECAY = r'must be in \[0, 1\)'
BAD_VALUES = [
  ('sgdm', 'learning_rate', -0.1, NON_NEGATIVE),
  ('sgdm', 'learning_rate', float('nan'), NON_NEGATIVE),
  ('sgdm', 'learning_rate', float('inf'), NON_NEGATIVE),
  ('sgdm', 'momentum', -0.9, NON_NEGATIVE),
  ('sgdm', 'momentum', 1.5, DECAY),
  ('adam', 'learning_rate', -1e-3, NON_NEGATIVE),
  ('adam', 'b1', -0.1, DECAY),
  ('adam', 'b2', 1.0, DECAY),
  ('adam', 'eps', -1e-8, NON_NEGATIVE),
  ('adagrad', 'learning_rate', -0.01, NON_NEGATIVE),
  ('adagrad', 'initial_accumulator_value', -0.1, NON_NEGATIVE),
  ('adagrad', 'eps', float('nan'), NON_NEGATIVE),
  ('rmsprop', 'learning_rate', -0.01, NON_NEGATIVE),
  ('rmsprop', 'decay', -0.9, DECAY),
  ('rmsprop', 'eps', -1.0, NON_NEGATIVE),
  ('yogi', 'learning_rate', -0.01, NON_NEGATIVE),
  ('yogi', 'b1', 1.2, DECAY),
  ('yogi', 'b2', -0.5, DECAY),
]


@pytest.mark.parametrize(
  'name, arg, value, expected',
  BAD_VALUES,
  ids=[f'{n}-{a}-{v}' for n, a, v, _ in BAD_VALUES],
)
def test_bad_values_raise_value_error_naming_the_argument(name, arg, value, expected):
  with pytest.raises(ValueError, match=rf'^{arg} {expected}; got {value!r}'):
    BUILDERS[name](**{arg: value})


@pytest.mark.parametrize('name', sorted(set(BUILDERS)))
def test_zero_learning_rate_is_allowed(name):
  optimizer = BUILDERS[name](learning_rate=0.0)
  updates, _ = run_updates(optimizer, optimizer.init(PARAMS))
  for u in jax.tree.leaves(updates):
    np.testing.assert_array_equal(u, 0.0)
