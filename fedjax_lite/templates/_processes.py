"""Process templates: NamedTuples of pure functions, validated once at construction.

TFF's templates carry static types; here the same checks run on signatures and, where specs of
`next`'s arguments are given, on `jax.eval_shape`, which traces without computing.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _errors


class MeasuredProcessOutput(NamedTuple):
  """`next`'s output for measured processes: new state, result, measurements (all pytrees)."""

  state: Any
  result: Any
  measurements: Any


class LearningProcessOutput(NamedTuple):
  """`LearningProcess.next`'s output: the new server state and the round's metrics."""

  state: Any
  metrics: Any


class StatefulLearningProcessOutput(NamedTuple):
  """A stateful `LearningProcess.next`'s output: the new server state, the round's metrics and
  the cohort's new per-client states (leaves `[clients, ...]`, in cohort order)."""

  state: Any
  metrics: Any
  client_states: Any


class CohortTooSmallError(ValueError):
  """Raised while tracing a process whose cohort has too few clients (e.g. for Krum).

  Attributes:
    min_clients: the smallest cohort the process accepts; construction checks that evaluate a
      process on made-up cohorts retry at this size.
  """

  def __init__(self, message: str, min_clients: int):
    super().__init__(message)
    self.min_clients = min_clients


class ClientResult(NamedTuple):
  """Client work's stacked result (TFF's `ClientResult@CLIENTS`).

  Attributes:
    update: leaves `[clients, ...]`.
    update_weight: `[clients]`.
    client_outputs: optional per-client outputs, leaves `[clients, ...]` (e.g. a client's new
      local state), `()` when the client work has none.
    client_mask: optional `[clients]` bool, True for the clients that take part in the
      aggregation; None: all do. A client that does not take part (padding added to fill a
      chunk, a device or a process block; a client with no example; a client whose update is
      not finite) has a zero update and weight 0, and the composer hands this mask to the
      aggregator's `next` (`client_mask=`), so stacked aggregators (a median) leave it out too.
    client_sum: the sum over the clients that take part of their `ClientOutput.client_sum` (no
      client axis; `()` when the client work has none), for the client work's own server-side
      update (SCAFFOLD's Σ Δc); never aggregated.
  """

  update: Any
  update_weight: Any
  client_outputs: Any = ()
  client_mask: Any = None
  client_sum: Any = ()


class StreamedClientResult(NamedTuple):
  """Client work's result when the aggregation streams through the cohort loop.

  Attributes:
    accumulated: the sum over clients of the aggregator's `client_part` (no client axis); the
      aggregator's `server_part` turns it into the aggregate.
    client_outputs: per-client outputs, leaves `[clients, ...]`, as in `ClientResult`.
    client_sum: as in `ClientResult`.
  """

  accumulated: Any
  client_outputs: Any = ()
  client_sum: Any = ()


def _positional_params(fn: Callable) -> tuple[int, int | None]:
  """(required, maximum) positional arguments of `fn`; maximum None for `*args`."""
  params = inspect.signature(fn).parameters.values()
  positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
  required = sum(p.default is p.empty for p in positional)
  var = any(p.kind is p.VAR_POSITIONAL for p in params)
  return required, None if var else len(positional)


def _check_initialize(initialize: Callable) -> None:
  if not callable(initialize):
    raise TypeError(f'initialize must be callable; got {type(initialize).__name__}')
  required, _ = _positional_params(initialize)
  kw_required = [
    p.name
    for p in inspect.signature(initialize).parameters.values()
    if p.kind is p.KEYWORD_ONLY and p.default is p.empty
  ]
  if required or kw_required:
    raise _errors.TemplateInitFnParamNotEmptyError(
      f'initialize must take no arguments; its signature is {inspect.signature(initialize)}. '
      'Tip: close over configuration instead of passing it.'
    )


def _check_next_arity(
  next_fn: Callable, num_args: int, signature_doc: str, exact: bool = True
) -> None:
  """Checks `next_fn` takes `num_args` positional arguments (at least, when not `exact`)."""
  if not callable(next_fn):
    raise TypeError(f'next must be callable; got {type(next_fn).__name__}')
  required, maximum = _positional_params(next_fn)
  if (exact and required > num_args) or (maximum is not None and maximum < num_args):
    raise _errors.TemplateNextFnNumArgsError(
      f'next must take {num_args} positional arguments {signature_doc}; its signature is '
      f'{inspect.signature(next_fn)}'
    )


def _traced_output(initialize: Callable, next_fn: Callable, arg_specs: tuple) -> tuple[Any, Any]:
  """(state spec from initialize, output spec of next) by abstract evaluation."""
  state_spec = jax.eval_shape(initialize)
  return state_spec, jax.eval_shape(next_fn, state_spec, *arg_specs)


def _check_state_assignable(state_spec: Any, new_state_spec: Any, what: str) -> None:
  mismatch = tree_lib.tree_spec_mismatch(state_spec, new_state_spec)
  if mismatch is not None:
    raise _errors.TemplateStateNotAssignableError(
      f"the state {what} is not assignable to initialize's state: {mismatch}"
    )


def _check_measured(initialize, next_fn, arg_specs) -> MeasuredProcessOutput | None:
  if arg_specs is None:
    return None
  state_spec, out = _traced_output(initialize, next_fn, tuple(arg_specs))
  if not isinstance(out, MeasuredProcessOutput):
    raise _errors.TemplateNotMeasuredProcessOutputError(
      'next must return MeasuredProcessOutput(state, result, measurements); '
      f'got {type(out).__name__}'
    )
  _check_state_assignable(state_spec, out.state, 'next returns')
  return out


class _IterativeProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[..., Any]


class IterativeProcess(_IterativeProcessFields):
  """`initialize() -> state` and `next(state, ...) -> state or (state, ...)`."""

  __slots__ = ()

  def __new__(cls, initialize, next, *, next_arg_specs: tuple | None = None):
    _check_initialize(initialize)
    _check_next_arity(
      next, 1 + len(next_arg_specs or ()), '(state, ...)', exact=bool(next_arg_specs)
    )
    if next_arg_specs is not None:
      state_spec, out = _traced_output(initialize, next, tuple(next_arg_specs))
      # `next` returns the state, or a tuple whose first element is the state (TFF's rule:
      # whichever is assignable; a NamedTuple state is a tuple too).
      whole = tree_lib.tree_spec_mismatch(state_spec, out)
      first = isinstance(out, tuple) and out and tree_lib.tree_spec_mismatch(state_spec, out[0])
      if whole is not None and first is not None:
        raise _errors.TemplateStateNotAssignableError(
          f"the state next returns is not assignable to initialize's state: {whole}"
        )
    return super().__new__(cls, initialize, next)

  @property
  def state_type(self) -> Any:
    """The state's structure: `initialize()`'s tree of `jax.ShapeDtypeStruct` (TFF's
    `state_type`), by abstract evaluation (nothing is computed)."""
    return jax.eval_shape(self.initialize)


class _MeasuredProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[..., MeasuredProcessOutput]


class MeasuredProcess(_MeasuredProcessFields):
  """`next(state, ...) -> MeasuredProcessOutput(state, result, measurements)`."""

  __slots__ = ()

  def __new__(cls, initialize, next, *, next_arg_specs: tuple | None = None):
    _check_initialize(initialize)
    _check_next_arity(
      next, 1 + len(next_arg_specs or ()), '(state, ...)', exact=bool(next_arg_specs)
    )
    _check_measured(initialize, next, next_arg_specs)
    return super().__new__(cls, initialize, next)


class _DistributionProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[[Any, Any], MeasuredProcessOutput]


class DistributionProcess(_DistributionProcessFields):
  """`next(state, server_value) -> MeasuredProcessOutput(state, value at the clients, m)`."""

  __slots__ = ()

  def __new__(cls, initialize, next, *, value_spec: Any = None):
    _check_initialize(initialize)
    _check_next_arity(next, 2, '(state, value)')
    _check_measured(initialize, next, None if value_spec is None else (value_spec,))
    return super().__new__(cls, initialize, next)


def _no_hparams(state):
  del state
  return {}


def _set_no_hparams(state, hparams):
  if hparams:
    raise ValueError(f'this process has no hyperparameters; got {sorted(hparams)}')
  return state


def _check_no_client_axis(value_spec_by_clients: dict[int, Any], what: str) -> None:
  """Raises LearningProcessPlacementError if a leaf's shape depends on the number of clients."""
  (n1, a), (n2, b) = value_spec_by_clients.items()
  mismatch = tree_lib.tree_spec_mismatch(a, b)
  if mismatch is not None:
    raise _errors.LearningProcessPlacementError(
      f'{what} must be a server value, but it changes with the number of clients '
      f'({n1} vs {n2}): {mismatch}. Tip: reduce over the client axis (axis 0).'
    )


class _ClientWorkProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[..., MeasuredProcessOutput]
  get_hparams: Callable[[Any], Any] = _no_hparams
  set_hparams: Callable[[Any, Any], Any] = _set_no_hparams
  streams: bool = False
  check_client_data: Callable[[Any], None] | None = None
  auto_chunk: bool = False
  client_devices: int = 1


class ClientWorkProcess(_ClientWorkProcessFields):
  """Local training of a cohort in one call.

  `next(state, model_weights, client_batches) -> MeasuredProcessOutput(state,
  ClientResult(update [clients, ...], update_weight [clients]), measurements)`; TFF's
  `(<S@SERVER, W@CLIENTS, {D*}@CLIENTS> -> <S@SERVER, ClientResult@CLIENTS, M@SERVER>)`.

  A client work that `streams` (every one `build_client_work` makes) also takes per-client
  inputs and an aggregator's per-client part: `next(state, model_weights, client_batches,
  client_inputs=(), *, client_part=None)`. With `client_part` `(update, weight, client_id) ->
  contribution`, the contributions are summed inside the cohort loop and the result is a
  `StreamedClientResult`; no `[clients, ...]` update is ever materialized. Client work whose
  clients read a server value (one `build_client_work` makes with a `client_loop_fn` of three
  parameters) also takes `broadcast=`: the value every client of the round receives (FedJAX's
  `shared_input`: a control variate, a frozen optimizer state, a learning rate).

  `check_client_data(client_batches)`, when given, checks concrete (host or untraced) client
  data against what the client work knows (e.g. labels against the model's classes) and raises
  a ValueError naming the client; `compose_learning_process` runs it on the host before each
  round is dispatched, never inside the compiled round.

  `auto_chunk`: its cohort loop runs with `client_chunk_size='auto'`, so
  `compose_learning_process` makes the round's `next` a `TunedNext` that measures the chunk;
  `client_devices`: the devices its cohort is sharded over (each loops over its share).
  """

  __slots__ = ()

  def __new__(
    cls,
    initialize,
    next,
    get_hparams=_no_hparams,
    set_hparams=_set_no_hparams,
    streams: bool = False,
    check_client_data: Callable[[Any], None] | None = None,
    auto_chunk: bool = False,
    client_devices: int = 1,
    *,
    weights_spec: Any = None,
    client_data_spec: Any = None,
  ):
    if check_client_data is not None and not callable(check_client_data):
      raise TypeError(
        f'check_client_data must be None or callable; got {type(check_client_data).__name__}'
      )
    _check_initialize(initialize)
    _check_next_arity(next, 3, '(state, model_weights, client_batches)')
    if streams and 'client_part' not in inspect.signature(next).parameters:
      raise _errors.TemplateNextFnNumArgsError(
        'a streaming client work must take a client_part keyword: next(state, model_weights, '
        f'client_batches, client_inputs=(), *, client_part=None); its signature is '
        f'{inspect.signature(next)}'
      )
    if weights_spec is not None and client_data_spec is not None:
      out = _check_measured(initialize, next, (weights_spec, client_data_spec))
      num_clients = jax.tree.leaves(client_data_spec)[-1].shape[0]
      if not isinstance(out.result, ClientResult):
        raise TypeError(f'client work must return a ClientResult; got {type(out.result).__name__}')
      bad = [leaf.shape for leaf in jax.tree.leaves(out.result) if leaf.shape[:1] != (num_clients,)]
      if bad:
        raise _errors.LearningProcessPlacementError(
          f'client work results must have a leading client axis of {num_clients}; got {bad}'
        )
    return super().__new__(
      cls,
      initialize,
      next,
      get_hparams,
      set_hparams,
      bool(streams),
      check_client_data,
      bool(auto_chunk),
      int(client_devices),
    )


class _AggregationProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[..., MeasuredProcessOutput]
  is_weighted: bool = True
  client_part: Callable[..., Any] | None = None
  server_part: Callable[[Any, Any], MeasuredProcessOutput] | None = None


def _check_parts(client_part: Any, server_part: Any, what: str) -> None:
  """A streaming process gives both parts, each callable, or neither."""
  if (client_part is None) != (server_part is None):
    raise ValueError(f'a streaming {what} needs both client_part and server_part')
  for name, fn in [('client_part', client_part), ('server_part', server_part)]:
    if fn is not None and not callable(fn):
      raise TypeError(f'{name} must be callable; got {type(fn).__name__}')


def _stacked_next(client_part, server_part, is_weighted):
  """`next` on stacked values from the streaming parts; client ids are the positions. Only the
  clients of `client_mask` (all when None) are summed."""

  def contributions(state, value, weight, client_mask):
    leaves = jax.tree.leaves((value, weight))
    ids = jnp.arange(leaves[0].shape[0] if leaves else 0, dtype=jnp.uint32)
    per_client = lambda v, *rest: client_part(state, v, *rest)
    return tree_lib.tree_sum_over_clients(
      jax.vmap(per_client)(value, *weight, ids), _keep(client_mask)
    )

  if is_weighted:

    def next_fn(state, value, weight, *, client_mask=None):
      return server_part(state, contributions(state, value, (weight,), client_mask))

  else:

    def next_fn(state, value, *, client_mask=None):
      return server_part(state, contributions(state, value, (), client_mask))

  return next_fn


def _keep(client_mask: Any) -> jax.Array | None:
  return None if client_mask is None else jnp.asarray(client_mask, bool)


def accepts_client_mask(fn: Callable) -> bool:
  """Whether `fn` takes a `client_mask` keyword (by name or through `**kwargs`)."""
  try:
    params = inspect.signature(fn).parameters.values()
  except (TypeError, ValueError):
    return False
  return any(p.name == 'client_mask' or p.kind is p.VAR_KEYWORD for p in params)


def with_client_mask(next_fn: Callable) -> Callable:
  """`next_fn` taking a `client_mask` keyword: itself when it does, else a wrapper that drops it.

  An aggregation's `next` written without `client_mask` sees the clients that do not take part
  as zero values of weight 0 (a weighted mean leaves them out; a median of its own counts them:
  take `client_mask` to leave them out).
  """
  if accepts_client_mask(next_fn):
    return next_fn

  def next_without_mask(state, *args, client_mask=None):
    del client_mask
    return next_fn(state, *args)

  return next_without_mask


def on_spec_cohorts(evaluate: Callable[[int], Any], sizes: tuple[int, ...]) -> dict[int, Any]:
  """`{n: evaluate(n)}` for made-up cohort sizes `sizes`, shifted up to the smallest cohort the
  process accepts when it raises `CohortTooSmallError` (construction checks only)."""
  try:
    return {n: evaluate(n) for n in sizes}
  except CohortTooSmallError as e:
    shift = e.min_clients - min(sizes)
    if shift <= 0:
      raise
    return {n + shift: evaluate(n + shift) for n in sizes}


class AggregationProcess(_AggregationProcessFields):
  """Reduces client values to a server value.

  `next(state, value [clients, ...], weight [clients]) -> MeasuredProcessOutput(state,
  result, measurements)` when `is_weighted`, `next(state, value)` otherwise.

  A **streaming** aggregation is given as two parts instead of `next` (which is then derived):
  `client_part(state, value, weight, client_id) -> contribution` (`(state, value, client_id)`
  when unweighted) runs per client inside the cohort loop; the contributions are summed over
  clients (across chunks, and with one `psum` across devices); `server_part(state, sum) ->
  MeasuredProcessOutput` runs once. An aggregation that needs every client at once (a median)
  gives `next` only and receives stacked values.

  **Padding is invisible.** The clients that do not take part in a round (padding added to fill
  a chunk, a device or a process block; a client with no example; a client whose update is not
  finite) have a zero value and weight 0. A streaming aggregation never sees them (their
  contributions are not summed). A stacked `next` receives them with `client_mask` `[clients]`
  bool (False for them; None: every client takes part): `next(state, value, weight, *,
  client_mask=None)`. Every `next` accepts the keyword; one written without it is wrapped to
  ignore it (see `with_client_mask`).
  """

  __slots__ = ()

  def __new__(
    cls,
    initialize,
    next=None,
    is_weighted: bool = True,
    *,
    client_part: Callable | None = None,
    server_part: Callable | None = None,
    value_spec: Any = None,
  ):
    _check_initialize(initialize)
    _check_parts(client_part, server_part, 'aggregation')
    if client_part is not None and next is None:
      next = _stacked_next(client_part, server_part, is_weighted)
    num_args = 3 if is_weighted else 2
    doc = '(state, value, weight)' if is_weighted else '(state, value)'
    _check_next_arity(next, num_args, doc)
    next = with_client_mask(next)
    if value_spec is not None:

      def evaluate(n):
        client_values = jax.tree.map(
          lambda s: jax.ShapeDtypeStruct((n, *s.shape), s.dtype), value_spec
        )
        args = (client_values, jax.ShapeDtypeStruct((n,), 'float32'))[: num_args - 1]
        return _check_measured(initialize, next, args)

      specs = on_spec_cohorts(evaluate, (2, 3))
      _check_no_client_axis({n: (o.state, o.result) for n, o in specs.items()}, 'aggregate')
      mismatch = tree_lib.tree_spec_mismatch(value_spec, min(specs.items())[1].result)
      if mismatch is not None:
        raise TypeError(f'the aggregate must match value_spec: {mismatch}')
    return super().__new__(cls, initialize, next, is_weighted, client_part, server_part)

  @property
  def streams(self) -> bool:
    """Whether the aggregation has a per-client part that can run inside the cohort loop."""
    return self.client_part is not None


class _EstimationProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[[Any, Any], Any]
  report: Callable[[Any], Any]
  client_part: Callable[[Any, Any], Any] | None = None
  server_part: Callable[[Any, Any], Any] | None = None


class EstimationProcess(_EstimationProcessFields):
  """Estimates a server value from client values across rounds (TFF's `EstimationProcess`).

  `next(state, value [clients], *, client_mask=None) -> state` and `report(state) -> estimate`.
  Given as streaming parts, `client_part(state, value) -> contribution` runs per client inside
  the cohort loop, the contributions are summed, and `server_part(state, sum) -> state` runs
  once; `next` is derived from them and sums only the clients of `client_mask` (the clients that
  take part, as in `AggregationProcess`).
  """

  __slots__ = ()

  def __new__(cls, initialize, next=None, report=None, *, client_part=None, server_part=None):
    _check_initialize(initialize)
    _check_parts(client_part, server_part, 'estimation')
    if next is None:
      if client_part is None:
        raise ValueError('an EstimationProcess needs next, or client_part and server_part')

      def next(state, value, *, client_mask=None):
        per_client = jax.vmap(lambda v: client_part(state, v))(value)
        return server_part(state, tree_lib.tree_sum_over_clients(per_client, _keep(client_mask)))

    _check_next_arity(next, 2, '(state, value)')
    next = with_client_mask(next)
    if not callable(report):
      raise TypeError(f'report must be callable; got {type(report).__name__}')
    return super().__new__(cls, initialize, next, report, client_part, server_part)

  @property
  def streams(self) -> bool:
    return self.client_part is not None


class _FinalizerProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[[Any, Any, Any], MeasuredProcessOutput]
  get_hparams: Callable[[Any], Any] = _no_hparams
  set_hparams: Callable[[Any, Any], Any] = _set_no_hparams


class FinalizerProcess(_FinalizerProcessFields):
  """`next(state, model_weights, update) -> MeasuredProcessOutput(state, new weights, m)`."""

  __slots__ = ()

  def __new__(
    cls,
    initialize,
    next,
    get_hparams=_no_hparams,
    set_hparams=_set_no_hparams,
    *,
    weights_spec: Any = None,
  ):
    _check_initialize(initialize)
    _check_next_arity(next, 3, '(state, model_weights, update)')
    if weights_spec is not None:
      out = _check_measured(initialize, next, (weights_spec, weights_spec.trainable))
      mismatch = tree_lib.tree_spec_mismatch(weights_spec, out.result)
      if mismatch is not None:
        raise TypeError(f'the finalizer must return model weights like its input: {mismatch}')
    return super().__new__(cls, initialize, next, get_hparams, set_hparams)


class _LearningProcessFields(NamedTuple):
  initialize: Callable[[], Any]
  next: Callable[[Any, Any], LearningProcessOutput]
  get_model_weights: Callable[[Any], Any]
  set_model_weights: Callable[[Any, Any], Any]
  get_hparams: Callable[[Any], Any] = _no_hparams
  set_hparams: Callable[[Any, Any], Any] = _set_no_hparams
  initial_client_state: Any = None


class LearningProcess(_LearningProcessFields, IterativeProcess):
  """A federated learning algorithm: `initialize() -> state`, `next(state, client_batches) ->
  LearningProcessOutput(state, metrics)`, `get_model_weights(state)`, `set_model_weights(state,
  weights)`; TFF's `(<S@SERVER, {D*}@CLIENTS> -> <S@SERVER, M@SERVER>)`.

  As in TFF it is an `IterativeProcess` (`isinstance` holds; `next` returns a tuple whose first
  element is the state) with its `state_type`.

  A **stateful** process (SCAFFOLD, personal models) has `initial_client_state`, the state of a
  client never seen (one client's pytree, no client axis): its `next(state, client_batches,
  client_states)` takes the cohort's states (leaves `[clients, ...]`, in cohort order) and
  returns `StatefulLearningProcessOutput(state, metrics, client_states)`. The states live
  outside the process, in a store keyed by client id (`fl.simulation.InMemoryClientStateStore`).

  With `client_data_spec` (a `ClientBatches` of `jax.ShapeDtypeStruct`), construction checks by
  abstract evaluation that `next` returns a `LearningProcessOutput` (stateful:
  `StatefulLearningProcessOutput` with client states like its input) whose state is assignable
  to `initialize`'s, and that neither state nor metrics change shape with the number of clients.
  """

  __slots__ = ()

  def __new__(
    cls,
    initialize,
    next,
    get_model_weights,
    set_model_weights,
    get_hparams=_no_hparams,
    set_hparams=_set_no_hparams,
    *,
    client_data_spec: Any = None,
    initial_client_state: Any = None,
  ):
    _check_initialize(initialize)
    if initial_client_state is None:
      _check_next_arity(next, 2, '(state, client_batches)')
    else:
      _check_next_arity(next, 3, '(state, client_batches, client_states)')
    for name, fn in [
      ('get_model_weights', get_model_weights),
      ('set_model_weights', set_model_weights),
    ]:
      if not callable(fn):
        raise TypeError(f'{name} must be callable; got {type(fn).__name__}')
    if client_data_spec is not None:
      _check_learning_process(
        initialize,
        next,
        get_model_weights,
        set_model_weights,
        client_data_spec,
        initial_client_state,
      )
    return super().__new__(
      cls,
      initialize,
      next,
      get_model_weights,
      set_model_weights,
      get_hparams,
      set_hparams,
      initial_client_state,
    )


def _with_num_clients(client_data_spec: _client_batches.ClientBatches, n: int):
  return jax.tree.map(lambda s: jax.ShapeDtypeStruct((n, *s.shape[1:]), s.dtype), client_data_spec)


def _stacked_spec(client_state: Any, num_clients: int) -> Any:
  """The spec of `num_clients` stacked copies of one client's state."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct((num_clients, *jnp.shape(x)), jnp.result_type(x)), client_state
  )


def _check_learning_process(
  initialize, next_fn, get_weights, set_weights, client_data_spec, initial_client_state=None
):
  if not isinstance(client_data_spec, _client_batches.ClientBatches):
    raise _errors.LearningProcessSequenceTypeError(
      'client data must be a ClientBatches(batch, mask) of per-client sequences of batches; got '
      f'{type(client_data_spec).__name__}'
    )
  mask_shape = tuple(client_data_spec.mask.shape)
  if len(mask_shape) != 3:
    raise _errors.LearningProcessSequenceTypeError(
      f'client data mask has shape {mask_shape}; expected (clients, steps, batch_size): every '
      'client holds a sequence of batches'
    )
  for path, leaf in jax.tree_util.tree_flatten_with_path(client_data_spec.batch)[0]:
    if tuple(leaf.shape[:3]) != mask_shape:
      raise _errors.LearningProcessPlacementError(
        f'client data leaf {tree_lib.keystr(path)} has shape {tuple(leaf.shape)}; expected a '
        f'leading (clients, steps, batch_size) = {mask_shape} like the mask'
      )
  n = mask_shape[0]
  stateful = initial_client_state is not None
  expected = StatefulLearningProcessOutput if stateful else LearningProcessOutput

  def evaluate(num_clients):
    args = (_with_num_clients(client_data_spec, num_clients),)
    if stateful:
      args += (_stacked_spec(initial_client_state, num_clients),)
    return args, _traced_output(initialize, next_fn, args)

  traced = on_spec_cohorts(evaluate, (n, n + 1))
  n = min(traced)
  outputs = {}
  state_spec = traced[n][1][0]
  for num_clients, (args, (_, out)) in traced.items():
    if not isinstance(out, expected):
      raise _errors.LearningProcessOutputError(
        f'next must return {expected.__name__}({", ".join(expected._fields)}); got '
        f'{type(out).__name__}'
      )
    if stateful:
      mismatch = tree_lib.tree_spec_mismatch(args[1], out.client_states)
      if mismatch is not None:
        raise _errors.LearningProcessOutputError(
          f'next must return client_states like the ones it takes: {mismatch}'
        )
    outputs[num_clients] = out
  _check_no_client_axis({k: o.state for k, o in outputs.items()}, 'the server state')
  _check_no_client_axis({k: o.metrics for k, o in outputs.items()}, 'the metrics')
  _check_state_assignable(state_spec, outputs[n].state, 'next returns')
  weights_spec = jax.eval_shape(get_weights, state_spec)
  _check_state_assignable(
    state_spec,
    jax.eval_shape(set_weights, state_spec, weights_spec),
    'set_model_weights returns',
  )
