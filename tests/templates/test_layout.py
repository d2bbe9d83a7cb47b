"""client_chunk_size='auto': the tuner picks the fastest candidate, caches it, reuses it, and the
choice never changes the result."""

import inspect
import json
import logging
import math

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl
from fedjax_lite.templates import _layout

SIZES = [7, 12, 5, 9, 3, 10, 4, 8, 6, 11, 2, 9, 5, 7, 3, 10, 6]  # 17 clients: every candidate
CANDIDATES = [1, 2, 4, 6, 9]  # 1, 2, 4, 8, 16 evened over 17 clients (8 and 16 both 9)


@pytest.fixture(autouse=True)
def tuning_on(monkeypatch, tmp_path):
  monkeypatch.setenv(_layout.TUNE_ENV, '1')
  monkeypatch.setenv(_layout.CACHE_DIR_ENV, str(tmp_path / 'cache'))


def _batches(seed=0, sizes=SIZES):
  clients = ref.random_clients(sizes, seed=seed)
  return fl.data.build_client_batches(clients, batch_size=4, num_steps=3, seed=seed)


def _fed_avg(**kwargs):
  return fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0), **kwargs
  )


def _fed_recon(**kwargs):
  model = ref.linear_model(5, 3)
  local = fl.ModelWeights(jax.tree.map(lambda _: False, model.initial_weights.trainable), ())
  local = local._replace(trainable={**local.trainable, 'b': True})
  return fl.reconstruction.build_fed_recon(
    fl.reconstruction.ReconstructionModel(model, local), **kwargs
  )


class FakeClock:
  """Seconds per candidate chunk, and the chunks timed, in order."""

  def __init__(self, seconds):
    self.seconds, self.timed = seconds, []

  def __call__(self, chunk, run):
    run()
    self.timed.append(chunk)
    return self.seconds[chunk]


def _tuned(process, clock, cache=None, budget_seconds=math.inf):
  raw = inspect.unwrap(process.next)  # the round, untuned
  return fl.templates.TunedNext(
    raw,
    lambda args: args[1].mask.shape[0],
    cache=cache or fl.templates.LayoutCache(),
    timer=clock,
    budget_seconds=budget_seconds,  # the fake clock decides, however slow compiling is here
  )


def test_candidates_are_distinct_even_layouts():
  assert _layout.candidates(len(SIZES), 'cpu') == CANDIDATES
  assert _layout.candidates(3, 'cpu') == [1, 2, 3]
  assert _layout.candidates(1000, 'gpu') == [63, 125, 250, 500, 1000]


def test_the_tuner_picks_the_fastest_caches_it_and_reuses_it_without_timing(tmp_path):
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  seconds = {1: 5.0, 2: 1.0, 4: 2.0, 6: 3.0, 9: 4.0}
  clock = FakeClock(seconds)
  cache = fl.templates.LayoutCache(tmp_path / 'layouts')
  tuned = _tuned(process, clock, cache)
  assert tuned.tune(state, batches) == 2
  # A descent from the default (4 over 17 clients: 5 chunks of 4), its neighbours 2 and 6, to
  # 2, whose other neighbour 1 is slower: 9 is never timed. No other chunk came within 1.25x
  # of the fastest, so none is timed again.
  assert clock.timed == [4, 4, 2, 2, 6, 6, 1, 1]
  stored = json.loads((tmp_path / 'layouts' / 'layouts.json').read_text())
  (entry,) = stored.values()
  assert entry['chunk'] == 2 and entry['seconds'] == {
    '1': 5.0,
    '2': 1.0,
    '4': 2.0,
    '6': 3.0,
  }
  assert tuned.layout(state, batches) == 2

  # A new process (a later run) recalls it from disk: nothing is timed, one program compiled.
  again = FakeClock(seconds)
  recalled = _tuned(_fed_avg(), again, cache)
  assert recalled.tune(state, batches) == 2 and again.timed == []
  recalled(state, batches)
  assert recalled._cache_size() == 1
  # Calls of another shape (5 clients: chunks 1, 2, 3, 5) are measured for that shape.
  five = FakeClock({1: 3.0, 2: 1.0, 3: 2.0, 5: 4.0})
  recalled._timer = five
  assert recalled.tune(state, _batches(sizes=SIZES[:5])) == 2 and five.timed


def test_close_finalists_are_timed_again_in_turn_and_the_median_decides():
  # 4 ran in a quiet moment during the descent; timed again beside 2, it is slower.
  later = {2: [1.0, 1.05], 4: [1.5, 1.6]}
  calls = []

  def time_once(chunk):
    calls.append(chunk)
    return later[chunk].pop(0)

  samples = {2: [1.0, 1.0], 4: [0.9, 0.95], 8: [2.0, 2.0]}  # 8: not within 1.25x of 0.9
  assert _layout.confirm(samples, time_once) == 2
  assert calls == [2, 4, 4, 2]  # interleaved, each round starting with the next finalist
  assert samples[4] == [0.9, 0.95, 1.5, 1.6] and samples[8] == [2.0, 2.0]
  # Medians within 3% are a tie, which the smaller chunk wins.
  later = {2: [1.02, 1.02], 4: [1.0, 1.0]}
  assert _layout.confirm({2: [1.02] * 2, 4: [1.0] * 2}, time_once) == 2
  # A spent budget still runs the first round, not the second.
  later, calls[:] = {2: [1.0], 4: [1.5]}, []
  assert _layout.confirm({2: [1.0], 4: [0.9]}, time_once, lambda: True) == 2 and calls == [2, 4]


def test_the_tuner_stores_the_medians_it_chose_by(tmp_path):
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  times = {4: [1.0, 1.0, 3.0, 3.0], 2: [1.1, 1.1, 1.1, 1.1], 6: [5.0] * 2}

  def clock(chunk, run):
    run()
    return times[chunk].pop(0)

  cache = fl.templates.LayoutCache(tmp_path)
  assert _tuned(process, clock, cache).tune(state, batches) == 2
  (entry,) = json.loads((tmp_path / 'layouts.json').read_text()).values()
  assert entry == {**entry, 'chunk': 2, 'seconds': {'2': 1.1, '4': 2.0, '6': 5.0}}


def test_a_corrupted_cache_entry_is_ignored_with_a_warning(tmp_path):
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  cache = fl.templates.LayoutCache(tmp_path)
  clock = FakeClock({1: 5.0, 2: 4.0, 4: 3.0, 6: 2.0, 9: 1.0})
  key = _tuned(process, clock, cache).key(state, batches)
  (tmp_path / 'layouts.json').write_text(json.dumps({key: {'chunk': 'eight'}}))
  with pytest.warns(RuntimeWarning, match='corrupted entry'):
    assert _tuned(process, clock, cache).tune(state, batches) == 9
  assert json.loads((tmp_path / 'layouts.json').read_text())[key]['chunk'] == 9  # rewritten
  (tmp_path / 'layouts.json').write_text('{not json')
  with pytest.warns(RuntimeWarning, match='ignoring the layout cache'):
    assert _tuned(process, FakeClock(clock.seconds), cache).tune(state, batches) == 9


def test_a_spent_budget_keeps_the_fastest_measured_so_far(tmp_path):
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  clock = FakeClock({1: 0.0, 2: 0.0, 4: 0.0, 6: 1.0, 9: 0.0})
  cache = fl.templates.LayoutCache(tmp_path)
  assert _tuned(process, clock, cache, budget_seconds=0).tune(state, batches) == 4
  assert clock.timed == []  # spent before the first candidate: the default, unmeasured


def test_no_tuning_when_turned_off(monkeypatch):
  monkeypatch.setenv(_layout.TUNE_ENV, '0')
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  clock = FakeClock({})
  tuned = _tuned(process, clock)
  assert tuned.tune(state, batches) == 4 and clock.timed == []  # the default: 4


@pytest.mark.parametrize(
  'build',
  [
    _fed_avg,
    lambda **kw: _fed_avg(model_aggregator=fl.aggregators.median_factory(), **kw),
    _fed_recon,
  ],
  ids=['fed_avg', 'median', 'fed_recon'],
)
def test_weights_after_two_rounds_do_not_depend_on_the_chosen_chunk(build, tmp_path):
  fixed = build(client_chunk_size=1)
  state = fixed.initialize()
  rounds = [_batches(1), _batches(2)]
  expected = state
  for batches in rounds:
    expected = fixed.next(expected, batches)[0]
  for winner in CANDIDATES:
    clock = FakeClock({c: abs(c - winner) for c in CANDIDATES})  # one valley, at the winner
    tuned = _tuned(build(), clock, fl.templates.LayoutCache(tmp_path / str(winner)))
    got = state
    for batches in rounds:
      got = tuned(got, batches)[0]  # the first call measures
    assert tuned.layout(state, rounds[0]) == winner
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_a_resumed_run_recalls_its_layout_reports_it_and_compiles_once(tmp_path, caplog):
  clients = ref.random_clients(SIZES, seed=0)

  def selection_fn(round_num):
    cohort = fl.data.sample_cohort(len(clients), 12, round_num, 0)
    return fl.data.build_client_batches(
      [clients[i] for i in cohort], batch_size=4, num_steps=3, seed=(0, round_num)
    )

  def run(total_rounds):
    metrics = fl.simulation.InMemoryMetricsManager()
    checkpoints = fl.simulation.FileCheckpointManager(tmp_path / 'checkpoints')
    state = fl.simulation.run_training_process(
      _fed_avg(),
      selection_fn,
      total_rounds,
      checkpoint_manager=checkpoints,
      metrics_managers=[metrics],
    )
    return state, metrics.metrics

  _, first = run(2)  # measured with the wall clock on this machine
  chunk = first[1]['layout/client_chunk_size']
  assert chunk in _layout.candidates(12) and first[2]['layout/client_chunk_size'] == chunk
  assert first[1]['timing/tuning_seconds'] > 0 and 'timing/tuning_seconds' not in first[2]
  cache = json.loads((tmp_path / 'cache' / 'layouts.json').read_text())
  assert [entry['chunk'] for entry in cache.values()] == [chunk]

  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger='jax'):
    _, resumed = run(4)  # a new process object: the layout comes from the cache
  rounds = [r for r in caplog.messages if r.startswith('Finished XLA compilation of jit(next_fn)')]
  assert len(rounds) == 1  # the round, once: no candidate compiled
  assert [resumed[r]['layout/client_chunk_size'] for r in (3, 4)] == [chunk, chunk]
  assert resumed[3]['timing/tuning_seconds'] < first[1]['timing/tuning_seconds']


def test_another_kind_of_machine_measures_again(tmp_path, monkeypatch):
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  cache = fl.templates.LayoutCache(tmp_path)
  first = FakeClock({1: 5.0, 2: 4.0, 4: 1.0, 6: 2.0, 9: 3.0})
  assert _tuned(process, first, cache).tune(state, batches) == 4
  monkeypatch.setattr(_layout, 'machine', lambda: 'gpu:H100x1')  # the run resumes elsewhere
  other = FakeClock({1: 1.0, 2: 2.0, 4: 3.0, 6: 4.0, 9: 5.0})
  assert _tuned(process, other, cache).tune(state, batches) == 1 and other.timed
  assert sorted(
    e['chunk'] for e in json.loads((tmp_path / 'layouts.json').read_text()).values()
  ) == [
    1,
    4,
  ]


def test_a_round_keys_its_layout_without_the_step_axis(tmp_path, caplog):
  """A bucketed population pads cohorts to a few step counts: the chunk measured at one serves
  the others (no candidate compiled again)."""
  process = _fed_avg()  # its own TunedNext, with the wall clock
  state = process.initialize()
  short, long = (
    _batches(),
    fl.data.build_client_batches(
      ref.random_clients(SIZES, seed=0), batch_size=4, num_steps=5, seed=0
    ),
  )
  chunk = process.next.tune(state, short)
  caplog.clear()
  with jax.log_compiles(), caplog.at_level(logging.WARNING, logger='jax'):
    assert process.next.tune(state, long) == chunk
  assert not [m for m in caplog.messages if m.startswith('Finished XLA compilation')]
  cache = json.loads((tmp_path / 'cache' / 'layouts.json').read_text())
  assert [entry['chunk'] for entry in cache.values()] == [chunk]


def test_rounds_that_slow_down_have_their_chunk_measured_again(tmp_path):
  """The best chunk depends on what else runs: a kept chunk whose rounds take 1.5x the seconds
  it was chosen at is measured again, over the disk cache, and the new choice is stored."""
  process, batches = _fed_avg(), _batches()
  state = process.initialize()
  cache = fl.templates.LayoutCache(tmp_path)
  tuned = _tuned(process, FakeClock({1: 5.0, 2: 4.0, 4: 1.0, 6: 2.0, 9: 3.0}), cache)
  assert tuned.tune(state, batches) == 4 and tuned.measured
  assert tuned.tune(state, batches) == 4 and not tuned.measured  # kept
  for seconds in (1.2, 1.4, 1.1, 1.3):  # within 1.5x of the 1.0 s it was chosen at
    assert not tuned.observe(seconds)
  assert not tuned.observe(2.0)  # the last 3: 1.1, 1.3, 2.0 (median 1.3)
  assert tuned.observe(2.5)  # the last 3: 1.3, 2.0, 2.5, median 2.0, 2x: measure again
  busy = FakeClock({1: 2.0, 2: 1.0, 4: 3.0, 6: 4.0, 9: 5.0})  # the host changed
  tuned._timer = busy
  assert tuned.tune(state, batches) == 2 and tuned.measured and busy.timed
  (entry,) = json.loads((tmp_path / 'layouts.json').read_text()).values()
  assert entry['chunk'] == 2 and cache.timing(tuned.key(state, batches)) == 1.0


def test_the_driver_measures_again_when_its_rounds_drift(tmp_path):
  """Through `run_training_process`: rounds far slower than the (fake) seconds the chunk was
  chosen at are measured again three rounds later, and the round that does says so."""
  process = _fed_avg()
  fast = FakeClock({c: 1e-9 for c in _layout.candidates(12)})  # no real round is this fast
  tuned = _tuned(process, fast, fl.templates.LayoutCache(tmp_path))
  clients = ref.random_clients(SIZES, seed=0)

  def selection_fn(round_num):
    cohort = fl.data.sample_cohort(len(clients), 12, round_num, 0)
    return fl.data.build_client_batches(
      [clients[i] for i in cohort], batch_size=4, num_steps=3, seed=(0, round_num)
    )

  metrics = fl.simulation.InMemoryMetricsManager()
  fl.simulation.run_training_process(
    process._replace(next=tuned), selection_fn, 6, metrics_managers=[metrics]
  )
  measured = [r for r, m in metrics.metrics.items() if 'timing/tuning_seconds' in m]
  assert measured == [1, 5]  # chosen; rounds 2-4 drift; measured again
