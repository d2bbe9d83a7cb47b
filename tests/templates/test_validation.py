"""Construction-time validation of the process templates: each error, from a minimal bad process.

Every case builds the smallest process that is wrong in exactly one way and checks both the
exception type (TFF's error names) and that the message says what is wrong.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import fedjax_lite as fl
from fedjax_lite import templates
from fedjax_lite.data import client_batches_spec

NUM_CLIENTS, NUM_STEPS, BATCH_SIZE, FEATURES = 4, 2, 5, 3
INPUT_SPEC = {
  'x': jax.ShapeDtypeStruct((None, FEATURES), jnp.float32),
  'y': jax.ShapeDtypeStruct((None,), jnp.int32),
}
DATA_SPEC = client_batches_spec(INPUT_SPEC, NUM_CLIENTS, NUM_STEPS, BATCH_SIZE)
VECTOR_SPEC = jax.ShapeDtypeStruct((FEATURES,), jnp.float32)


def _mpo(state, result=(), measurements=()):
  return templates.MeasuredProcessOutput(state, result, measurements)


# A well-formed learning process, written by hand: the server state is the running mean of the
# features seen, and the metrics are the number of real examples of the round.


def lp_initialize():
  return {'w': jnp.zeros((FEATURES,), jnp.float32), 'round': jnp.zeros((), jnp.int32)}


def lp_next(state, client_batches):
  x, mask = client_batches.batch['x'], client_batches.mask
  num_examples = jnp.sum(mask)
  real_x = jnp.where(mask[..., None] > 0, x, 0.0)  # padding may hold junk
  mean_x = jnp.sum(real_x, axis=(0, 1, 2)) / jnp.maximum(num_examples, 1.0)
  new_state = {'w': state['w'] + mean_x, 'round': state['round'] + 1}
  return fl.LearningProcessOutput(new_state, {'num_examples': num_examples})


def lp_get_model_weights(state):
  return state['w']


def lp_set_model_weights(state, weights):
  return {**state, 'w': weights}


def build_learning_process(**overrides):
  fns = {
    'initialize': lp_initialize,
    'next': lp_next,
    'get_model_weights': lp_get_model_weights,
    'set_model_weights': lp_set_model_weights,
  }
  client_data_spec = overrides.pop('client_data_spec', DATA_SPEC)
  fns.update(overrides)
  return fl.LearningProcess(
    fns['initialize'],
    fns['next'],
    fns['get_model_weights'],
    fns['set_model_weights'],
    client_data_spec=client_data_spec,
  )


def test_well_formed_learning_process_passes_and_runs():
  process = build_learning_process()
  assert isinstance(process, fl.LearningProcess)

  rng = np.random.default_rng(0)
  x = rng.standard_normal((NUM_CLIENTS, NUM_STEPS, BATCH_SIZE, FEATURES)).astype(np.float32)
  y = rng.integers(0, 3, (NUM_CLIENTS, NUM_STEPS, BATCH_SIZE)).astype(np.int32)
  mask = (rng.random((NUM_CLIENTS, NUM_STEPS, BATCH_SIZE)) < 0.6).astype(np.float32)
  x[mask == 0] = np.nan  # padding junk; the process masks it
  state = process.initialize()
  output = jax.jit(process.next)(state, fl.ClientBatches({'x': x, 'y': y}, mask))

  real = x[mask == 1]
  np.testing.assert_allclose(output.state['w'], real.mean(axis=0), rtol=1e-5)
  assert int(output.state['round']) == 1
  assert float(output.metrics['num_examples']) == mask.sum()
  assert jax.tree.structure(output.state) == jax.tree.structure(state)


# TemplateInitFnParamNotEmptyError


def _init_with_arg(seed):
  return jnp.zeros((), jnp.float32) + seed


def _init_with_kwonly(*, seed):
  return jnp.zeros((), jnp.float32) + seed


@pytest.mark.parametrize('initialize', [_init_with_arg, _init_with_kwonly], ids=['pos', 'kwonly'])
@pytest.mark.parametrize(
  'build',
  [
    lambda init: templates.IterativeProcess(init, lambda s: s),
    lambda init: templates.MeasuredProcess(init, lambda s: _mpo(s)),
    lambda init: fl.LearningProcess(init, lambda s, d: s, lambda s: s, lambda s, w: s),
    lambda init: templates.ClientWorkProcess(init, lambda s, w, d: s),
  ],
  ids=['iterative', 'measured', 'learning', 'client_work'],
)
def test_initialize_with_parameters_is_rejected(build, initialize):
  with pytest.raises(templates.TemplateInitFnParamNotEmptyError, match='initialize must take no'):
    build(initialize)


# TemplateNextFnNumArgsError


def _init():
  return jnp.zeros((), jnp.float32)


@pytest.mark.parametrize(
  'build, expected',
  [
    (
      lambda: fl.LearningProcess(_init, lambda s: s, lambda s: s, lambda s, w: s),
      r'next must take 2 positional arguments \(state, client_batches\)',
    ),
    (
      lambda: fl.LearningProcess(_init, lambda s, d, e: s, lambda s: s, lambda s, w: s),
      r'next must take 2 positional arguments \(state, client_batches\)',
    ),
    (
      lambda: templates.ClientWorkProcess(_init, lambda s, d: s),
      r'next must take 3 positional arguments \(state, model_weights, client_batches\)',
    ),
    (
      lambda: templates.AggregationProcess(_init, lambda s, v: _mpo(s, v)),
      r'next must take 3 positional arguments \(state, value, weight\)',
    ),
    (
      lambda: templates.AggregationProcess(_init, lambda s, v, w: _mpo(s, v), is_weighted=False),
      r'next must take 2 positional arguments \(state, value\)',
    ),
    (
      lambda: templates.FinalizerProcess(_init, lambda s, u: _mpo(s, u)),
      r'next must take 3 positional arguments \(state, model_weights, update\)',
    ),
    (
      lambda: templates.DistributionProcess(_init, lambda s: _mpo(s)),
      r'next must take 2 positional arguments \(state, value\)',
    ),
  ],
  ids=[
    'learning_1_arg',
    'learning_3_args',
    'client_work_2_args',
    'aggregation_weighted_2_args',
    'aggregation_unweighted_3_args',
    'finalizer_2_args',
    'distribution_1_arg',
  ],
)
def test_next_with_wrong_number_of_arguments_is_rejected(build, expected):
  with pytest.raises(templates.TemplateNextFnNumArgsError, match=expected):
    build()


# TemplateStateNotAssignableError

# (new state from the old one, what the message must say)
BAD_STATES = [
  (
    lambda s, x: {'w': (s['w'] + x).astype(jnp.int32)},
    r"leaf \['w'\] is int32\[3\]; expected float32\[3\]",
  ),
  (
    lambda s, x: {'w': jnp.concatenate([s['w'], x])},
    r"leaf \['w'\] is float32\[6\]; expected float32\[3\]",
  ),
  (lambda s, x: {'w': s['w'] + x, 'extra': x}, 'tree structure differs'),
  (lambda s, x: (s['w'] + x,), 'tree structure differs'),
]
BAD_STATE_IDS = ['dtype', 'shape', 'extra_leaf', 'container']


def _vector_state():
  return {'w': jnp.zeros((FEATURES,), jnp.float32)}


@pytest.mark.parametrize('new_state, expected', BAD_STATES, ids=BAD_STATE_IDS)
def test_iterative_process_state_not_assignable(new_state, expected):
  with pytest.raises(templates.TemplateStateNotAssignableError, match=expected):
    templates.IterativeProcess(
      _vector_state, lambda s, x: new_state(s, x), next_arg_specs=(VECTOR_SPEC,)
    )


@pytest.mark.parametrize('new_state, expected', BAD_STATES, ids=BAD_STATE_IDS)
def test_measured_process_state_not_assignable(new_state, expected):
  with pytest.raises(templates.TemplateStateNotAssignableError, match=expected):
    templates.MeasuredProcess(
      _vector_state, lambda s, x: _mpo(new_state(s, x), x, {}), next_arg_specs=(VECTOR_SPEC,)
    )


@pytest.mark.parametrize('new_state, expected', BAD_STATES, ids=BAD_STATE_IDS)
def test_learning_process_state_not_assignable(new_state, expected):
  def next_fn(state, client_batches):
    x = jnp.sum(client_batches.batch['x'] * client_batches.mask[..., None], axis=(0, 1, 2))
    return fl.LearningProcessOutput(new_state(state, x), {})

  with pytest.raises(templates.TemplateStateNotAssignableError, match=expected):
    build_learning_process(initialize=_vector_state, next=next_fn)


@pytest.mark.parametrize(
  'set_model_weights',
  [
    lambda state, weights: {'w': weights},  # drops 'round'
    lambda state, weights: {**state, 'w': weights.astype(jnp.float16)},
    lambda state, weights: {**state, 'w': weights[:2]},
  ],
  ids=['drops_leaf', 'dtype', 'shape'],
)
def test_set_model_weights_must_return_an_assignable_state(set_model_weights):
  with pytest.raises(
    templates.TemplateStateNotAssignableError, match='the state set_model_weights returns'
  ):
    build_learning_process(set_model_weights=set_model_weights)


def test_iterative_process_with_assignable_state_passes():
  process = templates.IterativeProcess(
    _vector_state, lambda s, x: {'w': s['w'] + x}, next_arg_specs=(VECTOR_SPEC,)
  )
  out = process.next(process.initialize(), jnp.arange(3.0))
  np.testing.assert_array_equal(out['w'], [0.0, 1.0, 2.0])


class CounterState(NamedTuple):
  total: jax.Array  # [3] float32
  count: jax.Array  # [] int32


def test_iterative_process_with_named_tuple_state_passes():
  # STYLE.md item 3: state is a NamedTuple named *State; `next` may return the state alone.
  def initialize():
    return CounterState(jnp.zeros((FEATURES,), jnp.float32), jnp.zeros((), jnp.int32))

  def next_fn(state, x):
    return CounterState(state.total + x, state.count + 1)

  process = templates.IterativeProcess(initialize, next_fn, next_arg_specs=(VECTOR_SPEC,))
  out = process.next(process.initialize(), jnp.ones((FEATURES,)))
  np.testing.assert_array_equal(out.total, np.ones(FEATURES))


def test_iterative_process_with_named_tuple_state_and_output_passes():
  def initialize():
    return CounterState(jnp.zeros((FEATURES,), jnp.float32), jnp.zeros((), jnp.int32))

  def next_fn(state, x):
    new = CounterState(state.total + x, state.count + 1)
    return new, {'norm': jnp.linalg.norm(new.total)}

  templates.IterativeProcess(initialize, next_fn, next_arg_specs=(VECTOR_SPEC,))


def test_stateless_iterative_process_with_empty_state_passes():
  # STYLE.md item 3: stateless components use an empty state.
  templates.IterativeProcess(lambda: (), lambda s, x: s, next_arg_specs=(VECTOR_SPEC,))


# TemplateNotMeasuredProcessOutputError


def test_measured_process_next_returning_plain_tuple_is_rejected():
  with pytest.raises(
    templates.TemplateNotMeasuredProcessOutputError, match=r'MeasuredProcessOutput.*got tuple'
  ):
    templates.MeasuredProcess(_vector_state, lambda s, x: (s, x, {}), next_arg_specs=(VECTOR_SPEC,))


def test_distribution_process_next_returning_plain_tuple_is_rejected():
  with pytest.raises(
    templates.TemplateNotMeasuredProcessOutputError, match=r'MeasuredProcessOutput.*got tuple'
  ):
    templates.DistributionProcess(lambda: (), lambda s, v: (s, v, {}), value_spec=VECTOR_SPEC)


def test_measured_process_returning_measured_output_passes():
  process = templates.MeasuredProcess(
    _vector_state, lambda s, x: _mpo(s, 2 * x, {'n': 1}), next_arg_specs=(VECTOR_SPEC,)
  )
  out = process.next(process.initialize(), jnp.ones((FEATURES,)))
  np.testing.assert_array_equal(out.result, 2 * np.ones(FEATURES))


# LearningProcessOutputError


def test_learning_process_next_returning_tuple_is_rejected():
  def next_fn(state, client_batches):
    out = lp_next(state, client_batches)
    return (out.state, out.metrics)

  with pytest.raises(
    fl.templates.LearningProcessOutputError, match=r'LearningProcessOutput.*got tuple'
  ):
    build_learning_process(next=next_fn)


def test_learning_process_next_returning_measured_output_is_rejected():
  def next_fn(state, client_batches):
    out = lp_next(state, client_batches)
    return templates.MeasuredProcessOutput(out.state, (), out.metrics)

  with pytest.raises(fl.templates.LearningProcessOutputError, match='got MeasuredProcessOutput'):
    build_learning_process(next=next_fn)


# LearningProcessSequenceTypeError


@pytest.mark.parametrize(
  'client_data_spec, expected',
  [
    (DATA_SPEC.batch, r'ClientBatches.*got dict'),
    (tuple(DATA_SPEC), r'ClientBatches.*got tuple'),
    (INPUT_SPEC, r'ClientBatches.*got dict'),
  ],
  ids=['batch_only', 'plain_tuple', 'input_spec'],
)
def test_client_data_spec_must_be_client_batches(client_data_spec, expected):
  with pytest.raises(templates.LearningProcessSequenceTypeError, match=expected):
    build_learning_process(client_data_spec=client_data_spec)


def test_client_data_mask_without_step_axis_is_rejected():
  # Every client holds one batch rather than a sequence of batches.
  flat = fl.ClientBatches(
    {
      'x': jax.ShapeDtypeStruct((NUM_CLIENTS, BATCH_SIZE, FEATURES), jnp.float32),
      'y': jax.ShapeDtypeStruct((NUM_CLIENTS, BATCH_SIZE), jnp.int32),
    },
    jax.ShapeDtypeStruct((NUM_CLIENTS, BATCH_SIZE), jnp.float32),
  )
  with pytest.raises(
    templates.LearningProcessSequenceTypeError,
    match=r'mask has shape \(4, 5\); expected \(clients, steps, batch_size\)',
  ):
    build_learning_process(client_data_spec=flat)


# LearningProcessPlacementError


def test_metrics_with_a_client_axis_are_rejected():
  def next_fn(state, client_batches):
    out = lp_next(state, client_batches)
    per_client = jnp.sum(client_batches.mask, axis=(1, 2))  # [clients]: not a server value
    return fl.LearningProcessOutput(out.state, {'num_examples': per_client})

  with pytest.raises(
    templates.LearningProcessPlacementError,
    match=r"the metrics must be a server value.*leaf \['num_examples'\]",
  ):
    build_learning_process(next=next_fn)


def test_server_state_with_a_client_axis_is_rejected():
  # initialize hard-codes the cohort size; next writes a per-client value into the state.
  def initialize():
    return {**lp_initialize(), 'per_client': jnp.zeros((NUM_CLIENTS,), jnp.float32)}

  def next_fn(state, client_batches):
    out = lp_next(state, client_batches)
    per_client = jnp.sum(client_batches.mask, axis=(1, 2))
    return fl.LearningProcessOutput({**out.state, 'per_client': per_client}, out.metrics)

  with pytest.raises(
    templates.LearningProcessPlacementError,
    match=r"the server state must be a server value.*leaf \['per_client'\]",
  ):
    build_learning_process(initialize=initialize, next=next_fn)


@pytest.mark.parametrize(
  'x_shape',
  [
    (NUM_CLIENTS, NUM_STEPS, BATCH_SIZE + 1, FEATURES),  # batch size differs from the mask's
    (NUM_CLIENTS + 1, NUM_STEPS, BATCH_SIZE, FEATURES),  # client count differs
    (NUM_STEPS, BATCH_SIZE, FEATURES),  # no client axis at all
  ],
  ids=['batch_size', 'clients', 'no_client_axis'],
)
def test_client_data_leaf_must_lead_with_the_mask_shape(x_shape):
  spec = fl.ClientBatches(
    {**DATA_SPEC.batch, 'x': jax.ShapeDtypeStruct(x_shape, jnp.float32)}, DATA_SPEC.mask
  )
  expected = rf"client data leaf \['x'\] has shape \({', '.join(map(str, x_shape))}\)"
  with pytest.raises(templates.LearningProcessPlacementError, match=expected):
    build_learning_process(client_data_spec=spec)


@pytest.mark.parametrize('weighted', [True, False])
def test_aggregator_result_with_a_client_axis_is_rejected(weighted):
  if weighted:

    def next_fn(state, value, weight):
      del weight
      return _mpo(state, value, {})  # forgot to reduce over clients

  else:

    def next_fn(state, value):
      return _mpo(state, value, {})

  with pytest.raises(
    templates.LearningProcessPlacementError, match='aggregate must be a server value'
  ):
    templates.AggregationProcess(
      lambda: (), next_fn, value_spec={'w': VECTOR_SPEC}, is_weighted=weighted
    )


def test_reducing_aggregator_passes():
  def next_fn(state, value, weight):
    mean = jax.tree.map(lambda v: jnp.tensordot(weight, v, 1) / jnp.sum(weight), value)
    return _mpo(state, mean, {})

  process = templates.AggregationProcess(lambda: (), next_fn, value_spec={'w': VECTOR_SPEC})
  out = process.next((), {'w': jnp.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])}, jnp.ones((2,)))
  np.testing.assert_allclose(out.result['w'], [2.0, 3.0, 4.0])
  assert process.is_weighted


def test_client_work_result_without_a_client_axis_is_rejected():
  def next_fn(state, weights, client_batches):
    del client_batches
    return _mpo(state, templates.ClientResult(weights, jnp.ones(())), {})

  with pytest.raises(templates.LearningProcessPlacementError, match='leading client axis of 4'):
    templates.ClientWorkProcess(
      lambda: (), next_fn, weights_spec=VECTOR_SPEC, client_data_spec=DATA_SPEC
    )


# Stateful learning processes: next(state, client_batches, client_states).

CLIENT_STATE = {'c': jnp.zeros((2,), jnp.float32)}


@pytest.mark.parametrize(
  ('client_states_out', 'expected'),
  [
    (lambda cs: cs, None),
    (lambda cs: None, 'next must return StatefulLearningProcessOutput'),
    (lambda cs: {'c': cs['c'][:, :1]}, r"client_states like the ones it takes: leaf \['c'\]"),
  ],
  ids=['ok', 'plain_output', 'wrong_shape'],
)
def test_stateful_learning_process_checks_its_client_states(client_states_out, expected):
  def next_fn(state, client_batches, client_states):
    out = lp_next(state, client_batches)
    new = client_states_out(client_states)
    return out if new is None else templates.StatefulLearningProcessOutput(*out, new)

  def build():
    return fl.LearningProcess(
      lp_initialize,
      next_fn,
      lp_get_model_weights,
      lp_set_model_weights,
      client_data_spec=DATA_SPEC,
      initial_client_state=CLIENT_STATE,
    )

  if expected is None:
    assert build().initial_client_state is CLIENT_STATE
  else:
    with pytest.raises(templates.LearningProcessOutputError, match=expected):
      build()
  with pytest.raises(templates.TemplateNextFnNumArgsError, match=r'\(state, client_batches, c'):
    fl.LearningProcess(
      lp_initialize,
      lp_next,
      lp_get_model_weights,
      lp_set_model_weights,
      initial_client_state=CLIENT_STATE,
    )
