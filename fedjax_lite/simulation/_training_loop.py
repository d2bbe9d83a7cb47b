"""`run_training_process`: the Python loop around compiled rounds (TFF's
`tff.simulation.run_training_process`, FedJAX's `run_federated_experiment`).

Nothing inside a round does I/O: the driver calls the jitted `process.next`, waits for it, then
evaluates, releases metrics and saves checkpoints between rounds.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import jax
import numpy as np

from fedjax_lite import tree as tree_lib
from fedjax_lite.simulation import (
  _checkpoint,
  _client_states,
  _driver,
  _ledger,
  _metrics_managers,
)

LAYOUT_KEY = 'layout'


def build_evaluation_fn(
  training_process: Any, evaluation_process: Any
) -> Callable[[Any, Any], Any]:
  """An `evaluation_fn` for `run_training_process` from a `build_fed_eval` process.

  The returned `evaluation_fn(state, client_batches)` evaluates
  `training_process.get_model_weights(state)` on `client_batches` (a fresh evaluation state
  each call) and returns that call's metrics, `{'loss', 'num_examples', <model metrics>}`
  (build_fed_eval's `current_round_metrics`).

  Example:
    >>> evaluation_fn = fl.simulation.build_evaluation_fn(
    ...     process, fl.algorithms.build_fed_eval(model))
  """
  for name, value in [
    ('training_process', training_process),
    ('evaluation_process', evaluation_process),
  ]:
    for method in ('initialize', 'next', 'get_model_weights', 'set_model_weights'):
      if not callable(getattr(value, method, None)):
        raise TypeError(f'{name} must be a LearningProcess (no callable .{method}); got {value!r}')
  initial_eval_state = []

  def evaluation_fn(state, client_batches):
    if not initial_eval_state:
      initial_eval_state.append(evaluation_process.initialize())
    eval_state = evaluation_process.set_model_weights(
      initial_eval_state[0], training_process.get_model_weights(state)
    )
    _, metrics = evaluation_process.next(eval_state, client_batches)
    return metrics['client_work']['eval']['current_round_metrics']

  return evaluation_fn


def check_positive_int(name: str, value: Any) -> None:
  if not isinstance(value, int) or isinstance(value, bool) or value < 1:
    raise ValueError(f'{name} must be an int >= 1; got {value!r}')


def check_callable(name: str, value: Any, signature: str) -> None:
  if not callable(value):
    raise TypeError(f'{name} must be callable {signature}; got {value!r}')


def check_privacy(name: str, privacy_accountant: Any, epsilon_budget: Any) -> None:
  """Raises unless `privacy_accountant` (argument `name`) is None or has a callable `epsilon`
  and `epsilon_budget` is None or a number > 0 with an accountant to measure it."""
  if privacy_accountant is not None and not callable(getattr(privacy_accountant, 'epsilon', None)):
    raise TypeError(f'{name} must have a callable .epsilon(rounds); got {privacy_accountant!r}')
  if epsilon_budget is not None:
    if privacy_accountant is None:
      raise ValueError('epsilon_budget needs a privacy_accountant to measure ε')
    if isinstance(epsilon_budget, bool) or not (
      isinstance(epsilon_budget, int | float) and epsilon_budget > 0
    ):
      raise ValueError(f'epsilon_budget must be a number > 0; got {epsilon_budget!r}')


def last_round_within_budget(
  privacy_accountant: Any, epsilon_budget: float, total_rounds: int
) -> int:
  """The last round, at most `total_rounds`, whose ε (`privacy_accountant.epsilon(round)`, which
  grows with the rounds) is at most `epsilon_budget`: where a run with that budget stops.

  Raises:
    ValueError: when even one round exceeds the budget (a run would train nothing).
  """
  one_round = privacy_accountant.epsilon(1)
  if one_round > epsilon_budget:
    raise ValueError(
      f'epsilon_budget={epsilon_budget:g} is below the epsilon of one round ({one_round:.4g}), '
      'so no round could run. Tip: raise epsilon_budget or the noise multiplier, or sample '
      'fewer clients a round.'
    )
  low, high = 1, total_rounds  # epsilon(low) <= budget; a binary search over the rounds
  if privacy_accountant.epsilon(high) <= epsilon_budget:
    return high
  while high - low > 1:
    middle = (low + high) // 2
    if privacy_accountant.epsilon(middle) <= epsilon_budget:
      low = middle
    else:
      high = middle
  return low


def run_training_process(
  process: Any,
  training_selection_fn: Callable[[int], Any],
  total_rounds: int,
  *,
  evaluation_fn: Callable[[Any, Any], Mapping[str, Any]] | None = None,
  evaluation_selection_fn: Callable[[int], Any] | None = None,
  rounds_per_evaluation: int = 1,
  checkpoint_manager: _checkpoint.FileCheckpointManager | None = None,
  rounds_per_checkpoint: int = 1,
  metrics_managers: Iterable[_metrics_managers.MetricsManager] = (),
  progress: bool = False,
  privacy_accountant: Any = None,
  epsilon_budget: float | None = None,
  client_state_store: _client_states.ClientStateStore | None = None,
  cohort_ids_fn: Callable[[int], Any] | None = None,
  donate_state: bool = True,
) -> Any:
  """Runs `process` for rounds 1..`total_rounds`, resuming from the latest checkpoint.

  Round 0 is the initial state. On a fresh start (no checkpoint) the driver calls
  `process.initialize()`, evaluates it if `evaluation_fn` is given and releases those metrics
  as round 0, and saves it as the checkpoint of round 0. If `checkpoint_manager` has a
  checkpoint of round k, the run restores it and continues at round k + 1 instead. Before the
  first round, every metrics manager's `clear_metrics(first round)` drops whatever an earlier,
  interrupted run released after its last checkpoint, so the outputs of a resumed run equal those
  of an uninterrupted one (except the timing values).

  Round r: `data = training_selection_fn(r)`; `state, metrics = process.next(state, data)`,
  waited for with `jax.block_until_ready`; evaluation when `r % rounds_per_evaluation == 0` or
  r is the last round; `release(metrics, r)` to each manager; a checkpoint when
  `r % rounds_per_checkpoint == 0` or r is the last round. The last round is `total_rounds`, or
  with `epsilon_budget` the last round whose ε is within it (`last_round_within_budget`): a run
  stopped by its budget ends as a finished one, evaluated and checkpointed at its last round,
  that checkpoint kept.

  A stateful process (`process.initial_client_state`, e.g. SCAFFOLD) needs
  `client_state_store` and `cohort_ids_fn`: round r runs `process.next(state, data,
  store.get(ids))` with `ids = cohort_ids_fn(r)` and puts the returned client states back.
  Before the checkpoint of a round is saved the store commits that round, and a resumed run
  rolls the store back to the restored round, so a killed and resumed run equals an
  uninterrupted one, states and store (a fresh run commits the store as given as round 0).

  The released metrics are flattened (`flatten_metrics`): the process metrics
  (`client_work/train/loss`, ...), `evaluation/<key>` when evaluated, and
  `timing/data_seconds` (training_selection_fn), `timing/train_seconds` (process.next until its
  outputs are ready; the first round includes compilation), `timing/evaluation_seconds`,
  `timing/round_seconds` (the three together) and `timing/examples_per_second`
  (the metrics' `num_examples` over train_seconds, when present). A process whose chunk is
  measured (`client_chunk_size='auto'`, `fl.templates.TunedNext`) also releases
  `layout/client_chunk_size` every round and, in the first round this call runs,
  `timing/tuning_seconds`: the part of its train_seconds spent choosing the chunk (measuring
  candidates, or recalling the choice from `layouts.json`).

  Args:
    process: a `LearningProcess` (or any process with `initialize()` and `next(state, data)`
      returning `(state, metrics mapping)`).
    training_selection_fn: `round_num -> client data` (e.g. a `ClientBatches`). The only data
      interface: wrap a prefetcher (e.g. `fl.data.Prefetcher`) as a function of round_num. For
      resumed runs to match, the data of round r must depend only on r (as
      `fl.data.sample_cohort(..., round_num, seed)` does).
    total_rounds: the last round (>= 1).
    evaluation_fn: `(state, evaluation data) -> metrics mapping`; see `build_evaluation_fn`.
    evaluation_selection_fn: `round_num -> evaluation data`; required with `evaluation_fn`.
    rounds_per_evaluation: evaluate every this many rounds (and at the last round).
    checkpoint_manager: saves and restores the state (e.g. a `FileCheckpointManager`).
    rounds_per_checkpoint: save every this many rounds (and at the last round).
    metrics_managers: where each round's flat metrics are released.
    progress: show a progress bar over rounds (only on a terminal; needs rich).
    privacy_accountant: e.g. `fl.aggregators.PrivacyAccountant`: its `epsilon(round_num)` is
      released every round as `privacy/epsilon`.
    epsilon_budget: stop before the first round whose ε would exceed it (the last round run is
      evaluated, checkpointed and returned, as the last round of a finished run); needs
      `privacy_accountant`. A budget below the ε of one round is a ValueError.
    client_state_store: the per-client states of a stateful process, e.g.
      `fl.simulation.SQLiteClientStateStore(path, process.initial_client_state)`.
    donate_state: the driver owns the state between rounds, so each round's `next` reuses
      the buffers of the state it replaces (`jax.jit(..., donate_argnums=0)`): the round holds
      one copy of the state, not two. False keeps every state readable (e.g. when a metrics
      manager or `evaluation_fn` keeps references to earlier states).
    cohort_ids_fn: `round_num -> the ids of round round_num's clients`, in the order of
      `training_selection_fn(round_num)`'s clients (ints, str or bytes; e.g. the ids given to
      `fl.data.batch_cohort`); checked against the data's `client_ids` when it has them.

  Returns:
    The state after round `total_rounds` (or after the last round the ε budget allows).
  """
  for method in ('initialize', 'next'):
    if not callable(getattr(process, method, None)):
      raise TypeError(
        f'process must have a callable .{method} (a LearningProcess); got {process!r}'
      )
  check_callable('training_selection_fn', training_selection_fn, 'round_num -> client data')
  check_positive_int('total_rounds', total_rounds)
  check_positive_int('rounds_per_evaluation', rounds_per_evaluation)
  check_positive_int('rounds_per_checkpoint', rounds_per_checkpoint)
  if (evaluation_fn is None) != (evaluation_selection_fn is None):
    raise ValueError(
      'evaluation_fn and evaluation_selection_fn go together; got only '
      + ('evaluation_fn' if evaluation_fn is not None else 'evaluation_selection_fn')
      + '. Tip: for fixed evaluation data use evaluation_selection_fn=lambda round_num: data.'
    )
  check_privacy('privacy_accountant', privacy_accountant, epsilon_budget)
  if evaluation_fn is not None:
    check_callable('evaluation_fn', evaluation_fn, '(state, evaluation data) -> metrics')
    check_callable('evaluation_selection_fn', evaluation_selection_fn, 'round_num -> data')
  check_client_states(process, client_state_store, cohort_ids_fn)
  last_round = total_rounds
  if epsilon_budget is not None:
    last_round = last_round_within_budget(privacy_accountant, epsilon_budget, total_rounds)
  managers = list(metrics_managers)
  for i, manager in enumerate(managers):
    if not callable(getattr(manager, 'release', None)):
      raise TypeError(
        f'metrics_managers[{i}] must have a callable release(metrics, round_num); got {manager!r}'
      )
  if checkpoint_manager is not None:
    for method in ('save_checkpoint', 'load_latest_checkpoint'):
      if not callable(getattr(checkpoint_manager, method, None)):
        raise TypeError(
          f'checkpoint_manager must have a callable .{method}; got {checkpoint_manager!r}'
        )

  evaluate = None
  if evaluation_fn is not None:
    evaluate = lambda state, r: _ledger.evaluate(evaluation_fn, evaluation_selection_fn, state, r)
  ledger = _ledger.RunLedger(
    last_round,
    checkpoint_manager=checkpoint_manager,
    metrics_managers=managers,
    evaluate=evaluate,
    rounds_per_evaluation=rounds_per_evaluation,
    rounds_per_checkpoint=rounds_per_checkpoint,
    privacy_accountant=privacy_accountant,
    client_state_store=client_state_store,
    reserved=(LAYOUT_KEY,),
  )
  runner = ProcessRunner(process, ledger, total_rounds, cohort_ids_fn, donate_state)
  _driver.drive([runner], training_selection_fn, progress)
  return runner.state


class ProcessRunner:
  """A `Runner` of one process's run (see `_driver.drive`): its state, advanced by
  `process.next` (jitted with the state donated), its client states through its ledger's store.

  Args:
    process: the run's process (`initialize`, `next`).
    ledger: the run's records; its checkpoint manager holds the checkpoints it resumes from.
    total_rounds: the run's rounds (a checkpoint past them is an error).
    cohort_ids_fn: `round_num -> ids` of a stateful process's cohort, or None.
    donate_state: `next` reuses the buffers of the state it replaces.
  """

  def __init__(
    self,
    process: Any,
    ledger: _ledger.RunLedger,
    total_rounds: int,
    cohort_ids_fn: Callable[[int], Any] | None = None,
    donate_state: bool = True,
  ):
    self._process, self._ledger = process, ledger
    self._total_rounds, self._cohort_ids_fn = total_rounds, cohort_ids_fn
    self._store = ledger.client_state_store
    self.last_round = ledger.last_round
    self.state, self.round = None, 0
    self._tuned = False
    next_fn = process.next
    self._tune = getattr(next_fn, 'tune', None)  # a TunedNext: its layout is measured
    self._observe = None  # its round times, to measure again when the host changes
    if donate_state and hasattr(next_fn, 'with_donated_state'):
      next_fn = next_fn.with_donated_state()  # the candidate kept is the program run
      self._tune, self._observe = next_fn.tune, next_fn.observe
    elif donate_state and hasattr(next_fn, 'lower'):  # a jitted next (every built process)
      next_fn = jax.jit(next_fn, donate_argnums=0)
    self._next = next_fn
    # A re-jitted `next` traces the data: its host-side check (labels vs classes) runs here.
    rejitted = next_fn is not process.next
    self._check = getattr(process.next, 'check_client_data', None) if rejitted else None

  def start(self) -> None:
    checkpoints = self._ledger.checkpoint_manager
    if checkpoints is not None:
      self.state, self.round = checkpoints.load_latest_checkpoint(
        jax.eval_shape(self._process.initialize)
      )
    if self.state is None:
      self.state, self.round = self._process.initialize(), 0
      self._ledger.start(self.state)
      return
    if self.round > self._total_rounds:
      raise ValueError(
        f'the latest checkpoint is of round {self.round}, past total_rounds='
        f'{self._total_rounds}. Tip: raise total_rounds, or use a fresh checkpoint folder.'
      )
    self._ledger.resume_at(self.round)
    if self.round > self.last_round:
      warnings.warn(
        f'the checkpoint of round {self.round} is past round {self.last_round}, the last its '
        'epsilon_budget allows; no round was run',
        RuntimeWarning,
        stacklevel=4,
      )

  def step(self, round_num: int, data: Any, data_seconds: float) -> list[dict[str, Any]]:
    if self._check is not None:
      self._check(data)
    args = (self.state, data)
    if self._store is not None:
      ids = cohort_ids(self._cohort_ids_fn, round_num, data)
      args += (self._store.get(ids),)
    timing = {'data_seconds': data_seconds}
    extra = {}
    start = time.perf_counter()
    if self._tune is not None:  # the layout is chosen (or recalled) before its shape compiles
      extra[f'{LAYOUT_KEY}/client_chunk_size'] = self._tune(*args)
      if not self._tuned or self._tune.__self__.measured:  # part of this round's train time
        timing['tuning_seconds'] = time.perf_counter() - start
        self._tuned = True
    called = time.perf_counter()
    self.state, process_metrics, *client_states = self._next(*args)
    jax.block_until_ready((self.state, process_metrics, client_states))
    if self._observe is not None and 'tuning_seconds' not in timing:  # a round like any other
      self._observe(time.perf_counter() - called)  # the call alone, as its layout was timed
    if self._store is not None:
      self._store.put(ids, client_states[0])
    self.round = round_num
    timing['train_seconds'] = time.perf_counter() - start
    flat = self._ledger.end_round(round_num, process_metrics, self.state, timing, extra)
    warn_if_no_usable_client(flat, data, round_num)
    return [flat]

  def finish(self) -> None:
    self._ledger.finish(max(self.last_round, self.round))


def check_client_states(process: Any, store: Any, cohort_ids_fn: Any) -> None:
  """A stateful process needs a store of its client states and the cohorts' ids; others none."""
  initial = getattr(process, 'initial_client_state', None)
  if initial is None:
    if store is not None or cohort_ids_fn is not None:
      raise ValueError(
        'client_state_store and cohort_ids_fn are for a stateful process (one with an '
        'initial_client_state, e.g. fl.algorithms.build_scaffold); this process keeps none'
      )
    return
  if store is None or cohort_ids_fn is None:
    raise ValueError(
      'this process keeps per-client state: pass client_state_store (e.g. '
      'fl.simulation.InMemoryClientStateStore(process.initial_client_state)) and cohort_ids_fn '
      "(round_num -> the ids of that round's clients)"
    )
  if not isinstance(store, _client_states.ClientStateStore):
    raise TypeError(f'client_state_store must be a ClientStateStore; got {type(store).__name__}')
  check_callable('cohort_ids_fn', cohort_ids_fn, 'round_num -> client ids')
  mismatch = tree_lib.tree_spec_mismatch(tree_lib.tree_specs(initial), store.default)
  if mismatch is not None:
    raise ValueError(
      f"client_state_store's default does not match process.initial_client_state: {mismatch}"
    )


def cohort_ids(cohort_ids_fn: Callable[[int], Any], round_num: int, data: Any) -> list[Any]:
  """`cohort_ids_fn(round_num)`, checked against the data's client count and 32-bit ids."""
  ids = list(cohort_ids_fn(round_num))
  mask, data_ids = getattr(data, 'mask', None), getattr(data, 'client_ids', None)
  if mask is not None and len(ids) != mask.shape[0]:
    raise ValueError(
      f"cohort_ids_fn({round_num}) gave {len(ids)} ids; the round's data has {mask.shape[0]} "
      'clients'
    )
  low_bits = np.asarray(_client_states.client_keys(ids), np.uint64).astype(np.uint32)
  if data_ids is not None and not np.array_equal(low_bits, jax.device_get(data_ids)):
    raise ValueError(
      f'cohort_ids_fn({round_num}) does not name the clients of training_selection_fn'
      f'({round_num}) in their order (their client_ids differ). Tip: derive both from the same '
      'fl.data.sample_cohort call.'
    )
  return ids


def warn_if_no_usable_client(flat: Mapping[str, Any], data: Any, round_num: int) -> None:
  """Warns when every client of the round was excluded as non-finite (the model stood still)."""
  excluded = next((v for k, v in flat.items() if k.endswith('non_finite_clients')), None)
  mask = getattr(data, 'mask', None)
  if excluded is None or mask is None or not excluded:
    return
  sampled = int((jax.device_get(mask).reshape(mask.shape[0], -1) > 0).any(axis=1).sum())
  if excluded >= sampled:
    warnings.warn(
      f'round {round_num}: no usable client; all {sampled} clients with data had non-finite '
      'updates and were excluded, so the model did not change. Tip: lower the learning rate, '
      'or clip updates (--aggregator clip).',
      RuntimeWarning,
      stacklevel=3,
    )
