"""build_sweep: K runs as one vectorized program equal K separate runs, compile once, and refuse
what one program cannot serve."""

import functools

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 12, 5, 9, 3, 10]
COHORT = 3
ROUNDS = 3
CLIENTS = ref.random_clients(SIZES, seed=0)


@functools.cache
def process_fn(seed):
  """FedAvg of a dropout model: the seed sets the initial weights and the client keys."""
  model = ref.dropout_linear_model(5, 3, seed)
  return fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0, momentum=0.9), seed=seed
  )


def cohort(round_num, seed=0, num_steps=3):
  ids = fl.data.sample_cohort(len(CLIENTS), COHORT, round_num, seed)
  return fl.data.build_client_batches(
    [CLIENTS[i] for i in ids], batch_size=4, num_steps=num_steps, seed=(seed, round_num)
  )


RUNS = [
  fl.templates.SweepRun(seed, {'client_work': {'learning_rate': lr}})
  for lr in (0.05, 0.2)
  for seed in (0, 1)
]


def separate_run(run, selection_fn):
  process = process_fn(run.seed)
  state = process.set_hparams(process.initialize(), run.hparams)
  for round_num in range(1, ROUNDS + 1):
    state, metrics = process.next(state, selection_fn(round_num))
  return state, metrics


def assert_close(run_tree, sweep_tree, k):
  for a, b in zip(jax.tree.leaves(run_tree), jax.tree.leaves(sweep_tree), strict=True):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b)[k], rtol=0, atol=1e-6)


LAYOUTS = pytest.mark.parametrize(
  'runs_per_lane', [1, 3, None], ids=['in-sequence', 'groups-of-3', 'vectorized']
)
# The layouts at their ends (groups of 3 mix both, and `test_four_runs...` covers them).
EXTREME_LAYOUTS = pytest.mark.parametrize(
  'runs_per_lane', [1, None], ids=['in-sequence', 'vectorized']
)


@LAYOUTS
def test_four_runs_equal_four_separate_runs(runs_per_lane):
  sweep = fl.templates.build_sweep(process_fn, RUNS, runs_per_lane=runs_per_lane)
  state = sweep.initialize()
  assert jax.tree.leaves(state)[0].shape[0] == 4
  for round_num in range(1, ROUNDS + 1):
    state, metrics = sweep.next(state, cohort(round_num))  # one cohort for all runs
  assert metrics['client_work']['train']['loss'].shape == (4,)
  for k, run in enumerate(RUNS):
    run_state, run_metrics = separate_run(run, cohort)
    assert_close(run_state, state, k)
    assert_close(run_metrics, metrics, k)
  weights = [np.asarray(w) for w in jax.tree.leaves(sweep.process.get_model_weights(state))]
  rngs = np.asarray(state.client_work.rng)
  assert not np.array_equal(weights[0][0], weights[0][1])  # seeds differ
  assert not np.array_equal(weights[0][0], weights[0][2])  # learning rates differ
  assert not np.array_equal(rngs[0], rngs[1]) and np.array_equal(rngs[0], rngs[2])


def test_next_compiles_once_for_every_round_and_group_of_one_size():
  traces, compiles = [], []
  base = process_fn(0)

  def counting_next(state, client_batches):
    traces.append(1)
    return base.next(state, client_batches)

  sweep = fl.templates.build_sweep(lambda seed: base._replace(next=counting_next), RUNS[::2])
  state = sweep.initialize()
  state, _ = sweep.next(state, cohort(1))

  def on_event(event, duration, **kwargs):
    if 'backend_compile' in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(on_event)
  try:
    for round_num in range(2, ROUNDS + 1):
      state, _ = sweep.next(state, cohort(round_num))
    jax.block_until_ready(state)
  finally:
    jax.monitoring.unregister_event_duration_listener(on_event)
  assert traces == [1] and compiles == []
  # Groups are slices of the run axis: two groups of one size share one program.
  for group in ([0], [1]):
    sweep.next(jax.tree.map(lambda x, g=group: x[np.array(g)], state), cohort(1))
  assert traces == [1, 1]


@EXTREME_LAYOUTS
def test_per_run_cohorts_equal_separate_runs(runs_per_lane):
  runs = RUNS[:3]
  # Each run its own cohorts, of different lengths: the steps are padded to the longest.
  selections = [
    functools.partial(cohort, seed=run.seed, num_steps=3 + k) for k, run in enumerate(runs)
  ]
  sweep = fl.templates.build_sweep(process_fn, runs, runs_per_lane=runs_per_lane)
  state = sweep.initialize()
  for round_num in range(1, ROUNDS + 1):
    batches = fl.simulation.stack_client_batches([select(round_num) for select in selections])
    assert batches.mask.shape == (3, COHORT, 5, 4)
    state, metrics = sweep.next(state, batches)
  for k, (run, select) in enumerate(zip(runs, selections, strict=True)):
    run_state, run_metrics = separate_run(run, select)
    assert_close(run_state, state, k)
    assert_close(run_metrics, metrics, k)
  with pytest.raises(ValueError, match=r'leading axis of 3, one cohort per run'):
    sweep.next(state, fl.simulation.stack_client_batches([cohort(1)] * 2))


def test_a_seed_that_reaches_next_is_refused():
  def closing_process_fn(seed):
    process = process_fn(seed)
    weights = process.get_model_weights(process.initialize())  # seeded, closed over by next

    def next_fn(state, client_batches):
      return process.next(process.set_model_weights(state, weights), client_batches)

    return process._replace(next=next_fn)

  sweep = fl.templates.build_sweep(closing_process_fn, RUNS[:2])
  with pytest.raises(ValueError, match='next that depends on the seed'):
    sweep.next(sweep.initialize(), cohort(1))


def test_bad_arguments():
  with pytest.raises(TypeError, match='process_fn must be callable'):
    fl.templates.build_sweep(None, RUNS)
  with pytest.raises(TypeError, match='runs must be a non-empty sequence of SweepRun'):
    fl.templates.build_sweep(process_fn, [])
  with pytest.raises(TypeError, match=r'runs\[1\] must be a SweepRun'):
    fl.templates.build_sweep(process_fn, [RUNS[0], {'seed': 1}])
  with pytest.raises(TypeError, match=r'runs\[0\]\.seed must be an int'):
    fl.templates.build_sweep(process_fn, [fl.templates.SweepRun(0.5)])
  with pytest.raises(TypeError, match=r'process_fn\(0\) must return a LearningProcess'):
    fl.templates.build_sweep(lambda seed: None, RUNS)
  for bad in (0, 2.0, True, 'all'):
    with pytest.raises(ValueError, match=r'runs_per_lane must be None, an int >= 1'):
      fl.templates.build_sweep(process_fn, RUNS, runs_per_lane=bad)
  with pytest.raises(ValueError, match=r"runs\[1\]\.hparams: .*unknown keys \['lr'\]"):
    runs = [RUNS[0], fl.templates.SweepRun(0, {'client_work': {'lr': 0.1}})]
    fl.templates.build_sweep(process_fn, runs).initialize()

  def shape_by_seed(seed):
    model = fl.models.mlp_classifier(5, 3, hidden=(2 + seed,), seed=seed)
    return fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))

  with pytest.raises(ValueError, match=r'process_fn\(1\) builds a state unlike process_fn\(0\)'):
    fl.templates.build_sweep(shape_by_seed, RUNS[:2])
  sweep = fl.templates.build_sweep(process_fn, RUNS[:1])
  with pytest.raises(ValueError, match=r"states\[0\] is not a state of this sweep's process"):
    sweep.stack([{'w': np.zeros(3)}])


@EXTREME_LAYOUTS
def test_a_sweep_of_sharded_processes_equals_the_unsharded_sweep(runs_per_lane):
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:2]), ('clients',))

  def sharded_fn(seed):
    model = ref.dropout_linear_model(5, 3, seed)
    return fl.algorithms.build_weighted_fed_avg(
      model,
      fl.optimizers.build_sgdm(0.1),
      fl.optimizers.build_sgdm(1.0, momentum=0.9),
      seed=seed,
      mesh=mesh,
    )

  sharded = fl.templates.build_sweep(sharded_fn, RUNS, runs_per_lane=runs_per_lane)
  plain = fl.templates.build_sweep(process_fn, RUNS, runs_per_lane=runs_per_lane)
  a, b = sharded.initialize(), plain.initialize()
  for round_num in range(1, ROUNDS + 1):  # 3 clients over 2 devices: one padded client
    a, metrics_a = sharded.next(a, cohort(round_num))
    b, metrics_b = plain.next(b, cohort(round_num))
  for k in range(len(RUNS)):
    assert_close(jax.tree.map(lambda x, k=k: x[k], b), a, k)
    assert_close(jax.tree.map(lambda x, k=k: x[k], metrics_b), metrics_a, k)
