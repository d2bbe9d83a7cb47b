"""Client state stores: round trips, commit/rollback, errors; SCAFFOLD through the driver, killed
and resumed, in memory and in SQLite, over a million-client population."""

import os
import re
import warnings

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl
from fedjax_lite.simulation import _client_states

# Exported as fl.simulation.ClientStateStoreError once the package's __init__ lists it.
StoreError = _client_states.ClientStateStoreError
DEFAULT = {'w': np.zeros((2, 3), np.float32), 'n': np.zeros((), np.int32)}


def _states(values):
  """Stacked states whose leaves are filled with `values` (one per client)."""
  v = np.asarray(values, np.int32)
  return {'w': np.broadcast_to(v[:, None, None], (len(v), 2, 3)).astype(np.float32), 'n': v}


@pytest.fixture(params=['memory', 'sqlite'])
def make_store(request, tmp_path):
  def make(default=DEFAULT, name='states'):
    if request.param == 'memory':
      return fl.simulation.InMemoryClientStateStore(default, tmp_path / name)
    return fl.simulation.SQLiteClientStateStore(tmp_path / f'{name}.sqlite', default)

  return make


def test_round_trip_defaults_and_ids(make_store):
  store = make_store()
  store.put([3, 'alice', b'bob'], _states([1, 2, 3]))
  got = store.get(['alice', 7, 3, 'alice'])
  np.testing.assert_array_equal(got['n'], [2, 0, 1, 2])
  assert got['w'].dtype == np.float32 and got['w'].shape == (4, 2, 3)
  np.testing.assert_array_equal(got['w'][:, 0, 0], [2, 0, 1, 2])
  # An int id and its 63-bit client_key are one client; a str id is keyed by its hash.
  np.testing.assert_array_equal(store.get([3 + 2**63])['n'], [1])
  np.testing.assert_array_equal(store.get([fl.data.client_key('alice')])['n'], [2])
  bits = np.array([np.nan, -0.0, 1e-45], np.float32)  # bitwise, not merely equal
  store.put(['x'], {'w': np.resize(bits, (1, 2, 3)), 'n': np.array([5], np.int32)})
  assert store.get(['x'])['w'].tobytes() == np.resize(bits, (1, 2, 3)).tobytes()
  assert len(store) == 4


def test_commit_and_rollback(make_store):
  store = make_store()
  store.put(['a', 'b'], _states([1, 1]))
  store.commit(1)
  store.put(['a'], _states([2]))
  store.commit(2, [1])
  store.put(['b', 'c'], _states([3, 3]))  # pending: a killed round
  np.testing.assert_array_equal(store.get(['a', 'b', 'c'])['n'], [2, 3, 3])
  store.rollback(2)
  np.testing.assert_array_equal(store.get(['a', 'b', 'c'])['n'], [2, 1, 0])
  store.rollback(1)
  np.testing.assert_array_equal(store.get(['a', 'b', 'c'])['n'], [1, 1, 0])
  store.rollback(0)
  assert len(store) == 0


def test_commit_forgets_what_no_kept_round_reads(tmp_path):
  store = fl.simulation.SQLiteClientStateStore(tmp_path / 's.sqlite', DEFAULT)
  for round_num in range(1, 6):
    store.put(['a'], _states([round_num]))
    store.commit(round_num, [round_num - 2, round_num - 1])
  store.put(['b'], _states([9]))
  store.commit(6, [4, 5])
  rows = store._db.execute('SELECT key, version FROM states ORDER BY version').fetchall()
  assert [v for _, v in rows] == [4, 5, 6]  # 'a' at 4 and 5 (rounds 4 and 5 read them), 'b'
  store.rollback(4)
  np.testing.assert_array_equal(store.get(['a', 'b'])['n'], [4, 0])


@pytest.mark.parametrize(
  ('ids', 'stacked', 'error', 'message'),
  [
    (['a', 'b'], _states([1]), ValueError, r"leaf \['n'\] is int32\[1\]; expected int32\[2\]"),
    (['a'], {'w': np.zeros((1, 2, 3)), 'n': np.zeros(1, np.int32)}, ValueError, 'is float64'),
    (['a'], {'w': np.zeros((1, 2, 3), np.float32)}, ValueError, 'stacked has tree structure'),
    (['a', 'a'], _states([1, 2]), ValueError, 'ids has duplicates'),
    ([1.5], _states([1]), TypeError, r'ids\[0\] is float; client ids must be int, str or bytes'),
    ('ab', _states([1, 2]), TypeError, 'ids must be a sequence of client ids; got str'),
  ],
)
def test_bad_input_is_refused(make_store, ids, stacked, error, message):
  with pytest.raises(error, match=message):
    make_store().put(ids, stacked)


def test_bad_get_ids_and_a_file_of_another_shape_are_refused(tmp_path):
  path = tmp_path / 's.sqlite'
  store = fl.simulation.SQLiteClientStateStore(path, DEFAULT)
  with pytest.raises(TypeError, match=r'ids\[1\] is NoneType'):
    store.get(['a', None])
  store.close()
  with pytest.raises(ValueError, match='holds client states shaped'):
    fl.simulation.SQLiteClientStateStore(path, {'w': np.zeros(3, np.float32)})
  memory = fl.simulation.InMemoryClientStateStore(DEFAULT)
  with pytest.raises(StoreError, match='no client states committed for round 2'):
    memory.rollback(2)


# Integrity: every stored state under a checksum, and a store in step with the checkpoints.

MARKED = 123456  # a state whose bytes are easy to find in a file


def _committed_store(make_store, name='states', clients=3):
  """A store with `clients` clients committed as rounds 1 and 2 (client 'marked' at round 2)."""
  store = make_store(name=name)
  store.put([f'c{i}' for i in range(clients)], _states(range(1, clients + 1)))
  store.commit(1)
  store.put(['marked'], _states([MARKED]))
  store.commit(2, [1])
  return store


def _store_file(tmp_path, kind, name='states', round_num=2):
  if kind == 'memory':
    return tmp_path / name / f'client_states_{round_num}.npz'
  return tmp_path / f'{name}.sqlite'


def _close(store):
  """Closes an SQLite store (as a process that exits); an in-memory store has its files."""
  if isinstance(store, fl.simulation.SQLiteClientStateStore):
    store.close()


def _kind(make_store):
  return (
    'memory'
    if isinstance(make_store(name='probe'), fl.simulation.InMemoryClientStateStore)
    else 'sqlite'
  )


def _flip_marked_state(path):
  """Flips a bit in the middle of the marked client's stored bytes (every copy in the file)."""
  data = bytearray(path.read_bytes())
  marker = np.int32(MARKED).tobytes() + np.full(6, MARKED, np.float32).tobytes()  # leaves n, w
  starts = [i for i in range(len(data)) if data.startswith(marker, i)]
  assert starts, f'the marked state is not stored raw in {path}'
  for start in starts:
    data[start + len(marker) // 2] ^= 0x10
  path.write_bytes(bytes(data))


def test_a_flipped_byte_in_a_stored_state_is_an_error_naming_the_file_and_client(
  make_store, tmp_path
):
  kind = _kind(make_store)
  _close(_committed_store(make_store))
  path = _store_file(tmp_path, kind)
  _flip_marked_state(path)
  store = make_store()
  if kind == 'memory':  # the snapshot is read whole when a run resumes: refused then
    with pytest.raises(StoreError, match=f'{re.escape(str(path))} is damaged'):
      store.rollback(2)
    return
  store.rollback(2)  # the index (keys, versions, checksums) is intact
  np.testing.assert_array_equal(store.get(['c0', 'c2'])['n'], [1, 3])  # undamaged states
  damaged = f"{re.escape(str(path))} is damaged: the state of client 'marked' does not match"
  with pytest.raises(StoreError, match=damaged):
    store.get(['c1', 'marked'])
  with pytest.raises(StoreError, match=r'the state of the client with key \d+ does not match'):
    store.verify()


@pytest.mark.parametrize('how', ['truncated', 'emptied', 'garbage'])
def test_a_truncated_or_overwritten_file_is_a_clear_error(make_store, tmp_path, how):
  kind = _kind(make_store)
  _close(_committed_store(make_store, clients=500))  # several pages
  path = _store_file(tmp_path, kind)
  data = path.read_bytes()
  path.write_bytes(
    {'truncated': data[: len(data) // 2], 'emptied': b'', 'garbage': b'x' * 5000}[how]
  )
  if kind == 'sqlite' and how == 'emptied':  # an empty file is a new store: it has no round 2
    with pytest.raises(StoreError, match='has no client states committed'):
      make_store().rollback(2)
    return
  with pytest.raises(StoreError, match=f'{re.escape(str(path))} (is damaged|cannot be used)'):
    make_store().rollback(2)


@pytest.mark.parametrize('how', ['deleted', 'emptied', 'behind'])
def test_rolling_back_to_a_round_the_file_never_committed_is_refused(make_store, tmp_path, how):
  kind = _kind(make_store)
  store = _committed_store(make_store)
  store.put(['c0'], _states([7]))
  store.commit(3, [1, 2])
  _close(store)
  path = _store_file(tmp_path, kind, round_num=3)
  if how == 'deleted':
    path.unlink()
  elif how == 'emptied':
    path.write_bytes(b'')
  elif kind == 'sqlite':  # behind: the file as it was after round 2
    path.unlink()
    _close(_committed_store(make_store))
  else:
    path.unlink()  # the snapshots of rounds 1 and 2 remain
  with pytest.raises(StoreError) as refused:
    make_store().rollback(3)
  message = str(refused.value)
  assert str(path if kind == 'sqlite' else path.parent) in message
  expected = {
    ('sqlite', 'deleted'): 'has no client states committed',
    ('sqlite', 'emptied'): 'has no client states committed',
    ('sqlite', 'behind'): 'holds client states up to round 2 only',
    ('memory', 'emptied'): 'is damaged',
  }.get((kind, how), 'no client states committed for round 3')
  assert expected in message and 'Tip:' in message
  if how == 'behind':
    make_store().rollback(2)  # a round it holds is fine


def test_committing_a_round_older_than_the_file_is_refused(tmp_path):
  """A run started over (no checkpoint) on a store of another run would read its later rows."""
  _committed_store(
    lambda name: fl.simulation.SQLiteClientStateStore(tmp_path / f'{name}.sqlite', DEFAULT)
  ).close()
  store = fl.simulation.SQLiteClientStateStore(tmp_path / 'states.sqlite', DEFAULT)
  assert store.committed_rounds == [1, 2]
  with pytest.raises(StoreError, match='committed as round 2; committing round 0 would leave'):
    store.commit(0)
  store.commit(2)  # the same round again (e.g. after a rollback) is fine
  memory = fl.simulation.InMemoryClientStateStore(DEFAULT)
  memory.commit(3)
  with pytest.raises(StoreError, match='committed as round 3; committing round 1'):
    memory.commit(1)


def test_a_file_of_the_earlier_format_is_refused(tmp_path):
  import sqlite3

  path = tmp_path / 'old.sqlite'
  db = sqlite3.connect(path)
  db.execute('CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT)')
  db.execute(
    'CREATE TABLE states (key INTEGER, version INTEGER, value BLOB, PRIMARY KEY (key, version))'
  )
  db.execute("INSERT INTO meta VALUES ('spec', '[]')")
  db.commit()
  db.close()
  with pytest.raises(StoreError, match='written by an earlier fedjax_lite, without checksums'):
    fl.simulation.SQLiteClientStateStore(path, DEFAULT)


# SCAFFOLD through run_training_process.

SIZES = [7, 12, 5, 9, 3, 10]
POPULATION = len(SIZES)
CLIENTS = ref.random_clients(SIZES)


class _CrashAt(fl.simulation.MetricsManager):
  """Raises from release at one round: after the round's put, before its checkpoint."""

  def __init__(self, round_num):
    self.round_num = round_num

  def release(self, metrics, round_num):
    if round_num == self.round_num:
      raise RuntimeError(f'simulated crash at round {round_num}')


def _cohort_ids(population):
  def cohort_ids(round_num):
    return [f'client{i}' for i in fl.data.sample_cohort(population, 3, round_num, seed=1)]

  return cohort_ids


def _select_fn(population):
  """`round_num -> ClientBatches` of `_cohort_ids(population)(round_num)`, in that order."""
  cohort_ids = _cohort_ids(population)

  def select(round_num):
    ids = cohort_ids(round_num)
    return fl.data.build_client_batches(
      [CLIENTS[fl.data.client_key(i) % len(CLIENTS)] for i in ids],
      batch_size=4,
      num_steps=3,
      seed=(1, round_num),
      client_keys=[fl.data.client_key(i) for i in ids],
    )

  return select


def _run(process, store, run_dir, total, population=POPULATION, managers=()):
  cohort_ids = _cohort_ids(population)
  return fl.simulation.run_training_process(
    process,
    _select_fn(population),
    total,
    checkpoint_manager=fl.simulation.FileCheckpointManager(run_dir, keep=2),
    metrics_managers=managers,
    client_state_store=store,
    cohort_ids_fn=cohort_ids,
  )


@pytest.fixture(scope='module')
def process():
  return fl.algorithms.build_scaffold(ref.linear_model(5, 3), 0.1, population_size=len(SIZES))


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_bitwise(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    assert x.dtype == y.dtype and x.tobytes() == y.tobytes()


ALL_IDS = [f'client{i}' for i in range(len(SIZES))]


def test_memory_and_sqlite_stores_give_identical_runs(process, tmp_path):
  memory = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
  sqlite = fl.simulation.SQLiteClientStateStore(tmp_path / 's.sqlite', process.initial_client_state)
  a = _run(process, memory, tmp_path / 'memory', 3)
  b = _run(process, sqlite, tmp_path / 'sqlite', 3)
  _assert_bitwise(a, b)
  _assert_bitwise(memory.get(ALL_IDS), sqlite.get(ALL_IDS))
  assert len(memory) == len(sqlite) > 3  # more than one cohort's clients were touched
  assert np.any(_leaves(a.client_work.control_variate)[0])


@pytest.mark.parametrize('kind', ['memory', 'sqlite'])
@pytest.mark.parametrize('crash_at', [3, 4])
def test_killed_after_round_2_and_resumed_equals_an_uninterrupted_run(
  process, tmp_path, kind, crash_at
):
  """Killed in round 3, or in round 4 with round 3's checkpoint damaged: both resume from round
  2, and the second must also drop the client states committed with round 3."""

  def open_store(name):
    if kind == 'memory':
      return fl.simulation.InMemoryClientStateStore(process.initial_client_state, tmp_path / name)
    return fl.simulation.SQLiteClientStateStore(
      tmp_path / f'{name}.sqlite', process.initial_client_state
    )

  reference_store = open_store('reference')
  reference = _run(process, reference_store, tmp_path / 'reference', 5)
  killed = open_store('run')
  with pytest.raises(RuntimeError, match=f'simulated crash at round {crash_at}'):
    _run(process, killed, tmp_path / 'run', 5, managers=[_CrashAt(crash_at)])
  if kind == 'sqlite':
    killed.close()  # as a killed process: the crashed round's puts were never committed
  if crash_at == 4:
    latest = tmp_path / 'run' / 'ckpt_3.msgpack'
    latest.write_bytes(latest.read_bytes()[:100])
  resumed_store = open_store('run')  # a new process: nothing but the files
  with warnings.catch_warnings():
    warnings.filterwarnings('ignore', r'checkpoint .*ckpt_3\.msgpack is unreadable')
    resumed = _run(process, resumed_store, tmp_path / 'run', 5)
  _assert_bitwise(resumed, reference)
  _assert_bitwise(resumed_store.get(ALL_IDS), reference_store.get(ALL_IDS))
  assert len(resumed_store) == len(reference_store)


@pytest.mark.parametrize('how', ['deleted', 'emptied', 'behind', 'started_over'])
def test_a_run_refuses_client_states_out_of_step_with_its_checkpoints(process, tmp_path, how):
  """Resuming with the store deleted, emptied or older than the checkpoint would restart every
  control variate at zero while the server's carries on; starting over (no checkpoint) on a
  store of rounds 1..4 would read its later rows. Each is refused, naming the file."""
  path, run_dir = tmp_path / 's.sqlite', tmp_path / 'run'
  store = fl.simulation.SQLiteClientStateStore(path, process.initial_client_state)
  _run(process, store, run_dir, 2)
  store.close()
  after_round_2 = path.read_bytes()
  store = fl.simulation.SQLiteClientStateStore(path, process.initial_client_state)
  _run(process, store, run_dir, 4)
  store.close()
  if how == 'deleted':
    path.unlink()
  elif how == 'emptied':
    path.write_bytes(b'')
  elif how == 'behind':
    path.write_bytes(after_round_2)
  else:
    for checkpoint in run_dir.iterdir():
      checkpoint.unlink()
  expected = {
    'deleted': 'has no client states committed .* the checkpoint being resumed is of round 4',
    'emptied': 'has no client states committed .* the checkpoint being resumed is of round 4',
    'behind': 'holds client states up to round 2 only, but the checkpoint .* of round 4',
    'started_over': 'holds client states committed as round 4; committing round 0 would leave',
  }[how]
  store = fl.simulation.SQLiteClientStateStore(path, process.initial_client_state)
  with pytest.raises(StoreError, match=f'{re.escape(str(path))} {expected}'):
    _run(process, store, run_dir, 5)


def test_a_million_client_population_stores_only_the_sampled_clients(tmp_path):
  population = 1_000_000
  process = fl.algorithms.build_scaffold(ref.linear_model(5, 3), 0.1, population_size=population)
  path = tmp_path / 's.sqlite'
  store = fl.simulation.SQLiteClientStateStore(path, process.initial_client_state)
  _run(process, store, tmp_path / 'run', 4, population=population)
  sampled = {i for r in range(1, 5) for i in _cohort_ids(population)(r)}
  assert len(store) == len(sampled) == 12
  store.close()
  assert os.path.getsize(path) < 64 * 1024  # a few pages, not a million rows


def test_the_driver_refuses_a_stateful_run_without_a_store(process, tmp_path):
  with pytest.raises(ValueError, match='this process keeps per-client state'):
    fl.simulation.run_training_process(process, lambda r: None, 1)
  fed_avg = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1)
  )
  store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
  with pytest.raises(ValueError, match='are for a stateful process'):
    fl.simulation.run_training_process(
      fed_avg, lambda r: None, 1, client_state_store=store, cohort_ids_fn=lambda r: []
    )
  other = fl.simulation.InMemoryClientStateStore({'w': np.zeros(2, np.float32)})
  with pytest.raises(ValueError, match="client_state_store's default does not match"):
    fl.simulation.run_training_process(
      process, lambda r: None, 1, client_state_store=other, cohort_ids_fn=lambda r: []
    )


def test_cohort_ids_that_do_not_match_the_data_are_refused(process, tmp_path):
  store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)

  def select(round_num):
    return fl.data.build_client_batches(CLIENTS[:3], batch_size=4, client_keys=[0, 1, 2])

  for ids, message in [(['a', 'b'], 'gave 2 ids; the round.s data has 3'), ([0, 2, 1], 'order')]:
    with pytest.raises(ValueError, match=message):
      fl.simulation.run_training_process(
        process, select, 1, client_state_store=store, cohort_ids_fn=lambda r, ids=ids: ids
      )


# SCAFFOLD in a sweep: a store per run, through the sweep's driver.

SWEEP_RUNS = [
  fl.templates.SweepRun(seed, {'client_work': {'learning_rate': lr}})
  for lr in (0.05, 0.2)
  for seed in (0, 1)
]


def _scaffold_fn(seed):
  return fl.algorithms.build_scaffold(
    ref.linear_model(5, 3, seed), 0.1, population_size=POPULATION, seed=seed
  )


_sweep_select = _select_fn(POPULATION)


def _run_scaffold_sweep(sweep, root, total, stores, managers=None):
  def metrics_managers(run_dir):
    return [
      *fl.simulation._sweep.default_metrics_managers(run_dir),
      *(managers or {}).get(os.path.basename(run_dir), []),
    ]

  return fl.simulation.run_sweep(
    sweep,
    _sweep_select,
    total,
    [root / f'run_{k}' for k in range(len(SWEEP_RUNS))],
    runs_per_program=2,
    metrics_managers_fn=metrics_managers,
    client_state_stores=stores,
    cohort_ids_fn=_cohort_ids(POPULATION),
  )


def _stores(process, root, name):
  return [
    fl.simulation.SQLiteClientStateStore(root / f'{name}_{k}.sqlite', process.initial_client_state)
    for k in range(len(SWEEP_RUNS))
  ]


@pytest.mark.parametrize('runs_per_lane', [1, None], ids=['in-sequence', 'vectorized'])
def test_scaffold_in_a_sweep_equals_its_runs_alone(tmp_path, runs_per_lane):
  sweep = fl.templates.build_sweep(_scaffold_fn, SWEEP_RUNS, runs_per_lane=runs_per_lane)
  stores = _stores(sweep.process, tmp_path, 'sweep')
  states = _run_scaffold_sweep(sweep, tmp_path / 'sweep', 3, stores)
  for k, run in enumerate(SWEEP_RUNS):
    lr = run.hparams['client_work']['learning_rate']
    process = fl.algorithms.build_scaffold(
      ref.linear_model(5, 3, run.seed), lr, population_size=POPULATION, seed=run.seed
    )
    alone_store = fl.simulation.InMemoryClientStateStore(process.initial_client_state)
    alone = fl.simulation.run_training_process(
      process,
      _sweep_select,
      3,
      client_state_store=alone_store,
      cohort_ids_fn=_cohort_ids(POPULATION),
    )
    # Float32 rounding only (the sweep's program fuses or vectorizes the round differently).
    for a, b in zip(_leaves(states[k]), _leaves(alone), strict=True):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(
      _leaves(stores[k].get(ALL_IDS)), _leaves(alone_store.get(ALL_IDS)), strict=True
    ):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert len(stores[k]) == len(alone_store) > 3
    assert np.any(_leaves(states[k].client_work.control_variate)[0])


def test_a_killed_scaffold_sweep_resumes_bitwise(tmp_path):
  sweep = fl.templates.build_sweep(_scaffold_fn, SWEEP_RUNS)
  reference_stores = _stores(sweep.process, tmp_path, 'reference')
  reference = _run_scaffold_sweep(sweep, tmp_path / 'reference', 5, reference_stores)
  # Run 2 crashes in round 3 before its checkpoint: its group (runs 2, 3) resumes from round 2,
  # its stores rolled back; the other group from round 3.
  stores = _stores(sweep.process, tmp_path, 'run')
  with pytest.raises(RuntimeError, match='simulated crash at round 3'):
    _run_scaffold_sweep(sweep, tmp_path / 'run', 5, stores, {'run_2': [_CrashAt(3)]})
  for store in stores:
    store.close()  # as a killed process: the crashed round's puts were never committed
  stores = _stores(sweep.process, tmp_path, 'run')  # a new process: nothing but the files
  resumed = _run_scaffold_sweep(sweep, tmp_path / 'run', 5, stores)
  for k in range(len(SWEEP_RUNS)):
    _assert_bitwise(resumed[k], reference[k])
    _assert_bitwise(stores[k].get(ALL_IDS), reference_stores[k].get(ALL_IDS))


def test_a_stateful_sweep_needs_a_store_per_run(tmp_path):
  sweep = fl.templates.build_sweep(_scaffold_fn, SWEEP_RUNS)
  store = fl.simulation.InMemoryClientStateStore(sweep.process.initial_client_state)
  with pytest.raises(ValueError, match='this process keeps per-client state'):
    _run_scaffold_sweep(sweep, tmp_path, 1, None)
  with pytest.raises(ValueError, match='a sequence of 4 stores, one per run'):
    _run_scaffold_sweep(sweep, tmp_path, 1, [store])
  with pytest.raises(ValueError, match='must be distinct'):
    _run_scaffold_sweep(sweep, tmp_path, 1, [store] * 4)
