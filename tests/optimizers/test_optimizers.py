"""Optimizer builders: hyperparameters in state, get/set_hparams, TFF's update rules in numpy."""

from __future__ import annotations

import inspect

import chex
import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

from fedjax_lite import optimizers

PARAMS = {'w': np.array([[0.5, -1.0], [2.0, 0.25]], np.float32), 'b': np.array([0.1], np.float32)}
# Scales that make Yogi's preconditioner both grow (g² > v) and shrink (g² < v).
GRADS = [
  jax.tree.map(
    lambda p, i=i, scale=scale: (
      (scale * np.cos(np.arange(p.size) + i)).reshape(p.shape).astype(np.float32)
    ),
    PARAMS,
  )
  for i, scale in enumerate([1.0, 0.5, 0.01, 2.0])
]


def tff_updates(name, h, grads=GRADS):
  """The updates of TFF's rule over `grads`, leaf by leaf (numpy, float64)."""
  out = [{} for _ in grads]
  for key in grads[0]:
    state = None
    for t, g in enumerate(grads):
      out[t][key], state = ref.tff_optimizer_update(name, h, g[key], state)
  return out


# (name, builder kwargs); every value differs from the builder's default.
CASES = [
  ('sgd', dict(learning_rate=0.3)),
  ('sgdm', dict(learning_rate=0.3, momentum=0.8)),
  ('adam', dict(learning_rate=0.02, b1=0.8, b2=0.95, eps=1e-3)),
  ('adagrad', dict(learning_rate=0.2, initial_accumulator_value=0.3, eps=1e-3)),
  ('rmsprop', dict(learning_rate=0.05, decay=0.8, eps=1e-3)),
  ('yogi', dict(learning_rate=0.04, b1=0.85, b2=0.99, eps=1e-2, initial_accumulator_value=1e-3)),
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


# Arguments that only seed the state at init are static, not hyperparameters.
STATIC_ARGS = {'adagrad': {'initial_accumulator_value'}, 'yogi': {'initial_accumulator_value'}}


@pytest.mark.parametrize('name, kwargs', CASES, ids=IDS)
def test_hyperparameters_live_in_state(name, kwargs):
  optimizer = BUILDERS[name](**kwargs)
  hparams = optimizers.get_hparams(optimizer.init(PARAMS))
  expected = set(kwargs) - STATIC_ARGS.get(name, set())
  assert expected == set(hparams)
  for key in expected:
    assert isinstance(hparams[key], jax.Array)
    assert hparams[key].dtype == jnp.float32 and hparams[key].shape == ()
    assert not hparams[key].weak_type
    np.testing.assert_allclose(hparams[key], kwargs[key], rtol=1e-6)


def test_sgdm_without_momentum_has_only_a_learning_rate():
  hparams = optimizers.get_hparams(optimizers.build_sgdm(0.1).init(PARAMS))
  assert set(hparams) == {'learning_rate'}


@pytest.mark.parametrize('name, kwargs', CASES, ids=IDS)
def test_updates_follow_tff_rule(name, kwargs):
  optimizer = BUILDERS[name](**kwargs)
  ours, _ = jax.jit(lambda state: run_updates(optimizer, state))(optimizer.init(PARAMS))
  chex.assert_trees_all_close(ours, tff_updates(name, kwargs), rtol=1e-5, atol=1e-7)


# The defaults of tff.learning.optimizers' builders, read from TFF's sources (main branch,
# tensorflow_federated/python/learning/optimizers/{sgdm,adam,adagrad,rmsprop,yogi}.py), in
# optax's names: beta_1/beta_2 -> b1/b2, epsilon -> eps, initial_preconditioner_value ->
# initial_accumulator_value. TFF's adaptive builders have no default learning rate.
TFF_DEFAULTS = {
  'sgdm': dict(learning_rate=0.01, momentum=None, nesterov=False),
  'adam': dict(b1=0.9, b2=0.999, eps=1e-7),
  'adagrad': dict(initial_accumulator_value=0.1, eps=1e-7),
  'rmsprop': dict(decay=0.9, eps=1e-7),
  'yogi': dict(b1=0.9, b2=0.999, eps=1e-3, initial_accumulator_value=1e-6),
}


@pytest.mark.parametrize('name', sorted(TFF_DEFAULTS))
def test_defaults_are_tffs(name):
  builder = BUILDERS[name]
  params = inspect.signature(builder).parameters
  for arg, value in TFF_DEFAULTS[name].items():
    assert params[arg].default == value, (name, arg)
  # And they are what the state holds: hyperparameters, and the accumulator's start.
  state = builder().init(PARAMS)
  hparams = optimizers.get_hparams(state)
  for arg, value in TFF_DEFAULTS[name].items():
    if arg in hparams:
      np.testing.assert_allclose(hparams[arg], value, rtol=1e-6)
  if 'initial_accumulator_value' in TFF_DEFAULTS[name]:
    start = TFF_DEFAULTS[name]['initial_accumulator_value']
    chex.assert_trees_all_close(
      state.inner_state.nu, jax.tree.map(lambda p: np.full_like(p, start), PARAMS)
    )


def test_nesterov_follows_tff_rule():
  """TFF's Nesterov SGD: `v <- m·v + g`, `w <- w - lr·(g + m·v)`."""
  lr, m = 0.3, 0.8
  optimizer = optimizers.build_sgdm(lr, momentum=m, nesterov=True)
  ours, state = run_updates(optimizer, optimizer.init(PARAMS))
  assert set(optimizers.get_hparams(state)) == {'learning_rate', 'momentum'}
  for key in PARAMS:
    v = np.zeros(PARAMS[key].shape)
    for t, g in enumerate(GRADS):
      g = np.asarray(g[key], np.float64)
      v = m * v + g
      np.testing.assert_allclose(ours[t][key], -lr * (g + m * v), rtol=1e-5, atol=1e-7)


def test_nesterov_needs_momentum():
  with pytest.raises(ValueError, match='nesterov=True needs a momentum'):
    optimizers.build_sgdm(0.1, nesterov=True)
  with pytest.raises(TypeError, match='nesterov must be a bool'):
    optimizers.build_sgdm(0.1, momentum=0.9, nesterov=1)


PLAIN_OPTAX = {
  'adam': lambda h: optax.adam(h['learning_rate'], h['b1'], h['b2'], h['eps']),
  'yogi': lambda h: optax.yogi(h['learning_rate'], h['b1'], h['b2'], h['eps']),
  'rmsprop': lambda h: optax.rmsprop(h['learning_rate'], h['decay'], h['eps']),
}


@pytest.mark.parametrize('name', sorted(PLAIN_OPTAX))
def test_tff_rule_is_not_optax_rule(name):
  """Where eps sits (and Yogi's initial moments) changes the steps: no silent fallback to optax."""
  kwargs = dict(CASES)[name]
  ours, _ = run_updates(BUILDERS[name](**kwargs), BUILDERS[name](**kwargs).init(PARAMS))
  plain = PLAIN_OPTAX[name](kwargs)
  theirs, _ = run_updates(plain, plain.init(PARAMS))
  pairs = zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True)
  gaps = [np.max(np.abs(a - b)) for a, b in pairs]
  assert max(gaps) > 1e-4


@pytest.mark.parametrize('name, kwargs', CASES, ids=IDS)
def test_set_hparams_changes_the_update_like_a_fresh_builder(name, kwargs):
  optimizer = BUILDERS[name](**kwargs)
  new = {'learning_rate': kwargs['learning_rate'] * 3}
  for decay in ('momentum', 'b1', 'decay'):
    if decay in kwargs:
      new[decay] = 0.5
  if 'eps' in kwargs:
    new['eps'] = kwargs['eps'] * 10
  state = optimizers.set_hparams(optimizer.init(PARAMS), new)

  for key, value in new.items():
    np.testing.assert_allclose(optimizers.get_hparams(state)[key], value, rtol=1e-6)
  ours, _ = run_updates(optimizer, state)
  chex.assert_trees_all_close(ours, tff_updates(name, {**kwargs, **new}), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name, kwargs', CASES, ids=IDS)
def test_get_set_round_trip(name, kwargs):
  state = BUILDERS[name](**kwargs).init(PARAMS)
  hparams = optimizers.get_hparams(state)
  again = optimizers.set_hparams(state, hparams)
  assert jax.tree.structure(again) == jax.tree.structure(state)
  chex.assert_trees_all_equal(optimizers.get_hparams(again), hparams)
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


@pytest.mark.parametrize('name, kwargs', CASES, ids=IDS)
def test_set_hparams_does_not_retrace_the_step(name, kwargs):
  chex.clear_trace_counter()  # chex counts traces per function definition, across cases
  optimizer = BUILDERS[name](**kwargs)

  @jax.jit
  @chex.assert_max_traces(n=1)
  def step(state, grads):
    return optimizer.update(grads, state, PARAMS)

  state = optimizer.init(PARAMS)
  hparams = optimizers.get_hparams(state)
  for scale in (1, 2, 3):  # ints, then floats: all cast to the stored float32
    new = {k: (0.1 * scale if k in ('b1', 'b2', 'decay', 'momentum') else scale) for k in hparams}
    state = optimizers.set_hparams(state, new)
    _, state = step(state, GRADS[0])


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


def test_a_hyperparameter_that_follows_a_schedule_cannot_be_set():
  optimizer = optimizers.build_sgdm(optax.linear_schedule(0.1, 0.0, 10), momentum=0.9)
  state = optimizer.init(PARAMS)
  assert set(optimizers.get_hparams(state)) == {'momentum'}
  with pytest.raises(ValueError, match=r"hparams \['learning_rate'\] follow a schedule"):
    optimizers.set_hparams(state, {'learning_rate': 0.5})
  state = optimizers.set_hparams(state, {'momentum': 0.5})  # the others still can be
  updates, _ = run_updates(optimizer, state, GRADS[:2])
  g0, g1 = GRADS[0]['w'], GRADS[1]['w']
  np.testing.assert_allclose(updates[0]['w'], -0.1 * g0, rtol=1e-6)
  np.testing.assert_allclose(updates[1]['w'], -0.09 * (0.5 * g0 + g1), rtol=1e-6)
