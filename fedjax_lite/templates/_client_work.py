"""Client work written per client: `ClientLoop(init, step, finalize)` and `build_client_work`,
which runs it for a whole cohort in one compiled call; `build_model_delta_client_work`
(FedAvg's local training) is one such description."""

from __future__ import annotations

import enum
import inspect
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.extend import core as jex_core
from jax.sharding import Mesh

from fedjax_lite import metrics as metrics_lib
from fedjax_lite import models, optimizers
from fedjax_lite import tree as tree_lib
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _cohort, _layout, _processes


class ClientWeighting(enum.Enum):
  """How a client's update is weighted in the aggregate.

  NUM_EXAMPLES: the real examples it trained on (E epochs of n examples count E·n).
  UNIFORM: 1 for every client that trained on at least one example (0 for an empty client).
  """

  NUM_EXAMPLES = 'num_examples'
  UNIFORM = 'uniform'


class ClientWorkState(NamedTuple):
  """Server-side state of every client work `build_client_work` makes.

  Attributes:
    hparams: the client work's hyperparameters, e.g. the client optimizer's
      `{'learning_rate': [] float32}` (`{}` when there are none).
    rng: `[2] uint32` key of this round's randomness, advanced every round.
    total_rounds_metrics: for evaluation, the metric state summed over all rounds so far; `()`
      for training.
  """

  hparams: Any
  rng: jax.Array
  total_rounds_metrics: Any = ()


class ClientOutput(NamedTuple):
  """What one client's `finalize` returns.

  Attributes:
    update: the client's model update, handed to the aggregator (`()` when nothing is sent).
    client_output: optional per-client output (e.g. a new local state), returned stacked
      `[clients, ...]` in cohort order, never aggregated.
    model_weights: the client's weights after its local work, full `ModelWeights` of the
      model, which the model's `report_local_outputs` reads (e.g. the L2 norm of the locally
      trained model); None: the weights the client was sent (right for evaluation).
    client_sum: optional per-client values summed over the clients that take part, inside the
      cohort loop like a streamed update (SCAFFOLD's Δc), and returned as the result's
      `client_sum` for the client work's own server-side update; never aggregated.
  """

  update: Any = ()
  client_output: Any = ()
  model_weights: Any = None
  client_sum: Any = ()


class ClientLoop(NamedTuple):
  """One client's local computation, written for a single client; `build_client_work` runs it
  for every client of a round, vmapped in chunks and compiled (FedJAX's
  `for_each_client(client_init, client_step, client_final)`).

  Attributes:
    init: `(client_input, key) -> carry`. `client_input` is the client's slice of the
      per-client inputs (`()` when none); `key` is keyed by round and client id.
    step: `(carry, batch, mask [batch_size], key) -> (carry, step_metrics)` on one padded batch
      (leaves `[batch_size, ...]`); `key` is folded with the step index. `step_metrics` is
      `(BatchOutput, labels)` to count in the metrics, or None. A step whose mask is all zero
      keeps the old carry whatever `step` returns.
    finalize: `(carry) -> ClientOutput`.
  """

  init: Callable[[Any, jax.Array], Any]
  step: Callable[[Any, Any, jax.Array, jax.Array], tuple[Any, Any]]
  finalize: Callable[[Any], ClientOutput]


def masked_batch(batch: Any, mask: jax.Array) -> Any:
  """Zeroes the padded examples of `batch` (leaves `[batch_size, ...]`) so junk cannot leak."""

  def zero(x):
    m = jnp.reshape(mask > 0, mask.shape + (1,) * (x.ndim - 1))
    return jnp.where(m, x, jnp.zeros((), x.dtype))

  return jax.tree.map(zero, batch)


def masked_forward(model, weights, batch, mask, training, rng=None):
  """`(loss [], (BatchOutput, labels))` of one padded batch, padding masked out of everything.

  The second element is a `ClientLoop.step`'s `step_metrics`: the labels are the batch's,
  padded rows zeroed, ready for the metric update.
  """
  batch = masked_batch(batch, mask)
  x, y = models.split_batch(batch)
  if model.uses_forward_pass:
    batch_output = model.forward_pass(weights, batch, training, rng=rng, mask=mask)
    return batch_output.loss, (batch_output, y)
  predictions = model.predict_on_batch(weights, x, training, rng=rng, mask=mask)
  loss = model.loss(predictions, y, mask)
  num_examples = jnp.sum(mask > 0).astype(jnp.int32)
  return loss, (models.BatchOutput(predictions, loss, num_examples), y)


def masked_grad(model, weights, batch, mask, rng=None):
  """One training forward/backward pass on a padded batch (leaves `[batch_size, ...]`).

  Returns:
    `(grads, step_metrics)`: gradients of the masked mean loss with respect to
    `weights.trainable`, and `(BatchOutput, labels)` of this batch for the metrics.
  """

  def loss_fn(trainable):
    return masked_forward(model, weights._replace(trainable=trainable), batch, mask, True, rng)

  (_, step_metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(weights.trainable)
  return grads, step_metrics


def optimizer_step(model, optimizer, weights, opt_state, batch, mask, key):
  """One local optimizer step on a padded batch: the step of most `ClientLoop`s.

  Returns `(weights with new trainables, opt_state, step_metrics)`; `key` reaches the model
  only when it takes an `rng`.
  """
  rng = key if model.uses_rng else None
  grads, step_metrics = masked_grad(model, weights, batch, mask, rng)
  updates, opt_state = optimizer.update(grads, opt_state, weights.trainable)
  weights = weights._replace(trainable=optax.apply_updates(weights.trainable, updates))
  return weights, opt_state, step_metrics


def training_metric_fns(model) -> tuple[Callable, Callable, Callable]:
  """`loss` and `num_examples`, always reported, plus the model's own metrics (which win)."""
  builtin = metrics_lib.create_functional_metric_fns(
    {'loss': metrics_lib.loss(), 'num_examples': metrics_lib.num_examples()}
  )

  def initialize():
    return {'builtin': builtin[0](), 'model': model.initialize_metrics_state()}

  def update(state, labels, batch_output, sample_weight):
    return {
      'builtin': builtin[1](state['builtin'], labels, batch_output, sample_weight),
      'model': model.update_metrics_state(state['model'], labels, batch_output, sample_weight),
    }

  def finalize(state):
    return {**builtin[2](state['builtin']), **model.finalize_metrics(state['model'])}

  return initialize, update, finalize


def report_client_metrics(model, metric_state: Any, weights: models.ModelWeights) -> Any:
  """A client's `training_metric_fns` state as it leaves the client: the model's part goes
  through `model.report_local_outputs` of the client's final `weights`."""
  return {**metric_state, 'model': model.report_local_outputs(weights, metric_state['model'])}


def client_weight(
  client_weighting: ClientWeighting | Callable, num_examples: jax.Array, metrics: Any
) -> jax.Array:
  """`[]` float32 weight of one client's update."""
  if client_weighting is ClientWeighting.NUM_EXAMPLES:
    return num_examples.astype(jnp.float32)
  if client_weighting is ClientWeighting.UNIFORM:
    return (num_examples > 0).astype(jnp.float32)
  return jnp.asarray(client_weighting(metrics), jnp.float32)


def check_client_weighting(client_weighting: Any) -> None:
  if not (isinstance(client_weighting, ClientWeighting) or callable(client_weighting)):
    raise TypeError(
      'client_weighting must be a ClientWeighting or a callable of the client metrics; got '
      f'{client_weighting!r}'
    )


def check_model(model: Any) -> None:
  """Raises unless `model` is a `FunctionalModel` on which padding changes nothing (checked once
  per model, see `fl.models.check_padding_invariance`)."""
  if not isinstance(model, models.FunctionalModel):
    raise TypeError(
      f'model must be a fedjax_lite.FunctionalModel; got {type(model).__name__}. '
      'Tip: wrap a flax module with fl.models.from_flax.'
    )
  if model not in _PADDING_CHECKED:
    models.check_padding_invariance(model)
    _PADDING_CHECKED.add(model)


_PADDING_CHECKED: weakref.WeakSet = weakref.WeakSet()


def check_optimizer(optimizer: Any, name: str) -> None:
  if not isinstance(optimizer, optax.GradientTransformation):
    raise TypeError(
      f'{name} must be an optax.GradientTransformation (e.g. fl.optimizers.build_sgdm(0.1)); '
      f'got {type(optimizer).__name__}'
    )


# Forward passes that run one client per lane on a CPU: convolutions (vmapped over clients they
# become grouped convolutions, ~3x slower on XLA:CPU) and loops (a recurrent layer's scan over
# time: its many small matmuls batched over clients ran an LSTM round at 0.71-0.81x a Python loop
# at 4 clients a lane, 1.04-1.08x at one; benchmarks/lstm_round.py).
_ONE_LANE_PRIMITIVES = frozenset({'conv_general_dilated', 'scan', 'while'})


def _one_client_per_lane_on_cpu(model: models.FunctionalModel) -> bool:
  """Whether JAX runs on a CPU and the model's forward pass convolves or loops (read from its
  jaxpr; nothing is computed)."""
  if jax.default_backend() != 'cpu':
    return False
  spec = jax.tree.map(lambda s: jax.ShapeDtypeStruct((1, *s.shape[1:]), s.dtype), model.input_spec)
  x, _ = models.split_batch(spec)
  jaxpr = jax.make_jaxpr(lambda w, x: model.predict_on_batch(w, x, False))(model.initial_weights, x)

  def walk(jaxpr):
    for eqn in jaxpr.eqns:
      if eqn.primitive.name in _ONE_LANE_PRIMITIVES:
        return True
      for sub in jex_core.jaxprs_in_params(eqn.params):
        if walk(sub):
          return True
    return False

  return walk(jaxpr.jaxpr)


def _spec_batch(model: models.FunctionalModel, batch_size: int) -> Any:
  """`model.input_spec` with an unknown batch dimension set to `batch_size`."""

  def leaf(s):
    if not s.shape or s.shape[0] is not None:
      return s
    return jax.ShapeDtypeStruct((batch_size, *s.shape[1:]), s.dtype)

  return jax.tree.map(leaf, model.input_spec)


def model_num_classes(model: models.FunctionalModel) -> int | None:
  """The number of classes of a classifier: the last axis of its predictions, when its labels
  are integer indices into that axis (`predictions [batch, ..., C]`, `labels [batch, ...]`,
  C >= 2); None for any other model (regression, matrix factorization, k-means, a single
  logit). Read from `jax.eval_shape` of the model: nothing is computed."""
  batch = _spec_batch(model, 2)
  _, y = models.split_batch(batch)
  if not isinstance(y, jax.ShapeDtypeStruct) or not jnp.issubdtype(y.dtype, jnp.integer):
    return None
  key = jax.random.PRNGKey(0)
  mask = jax.ShapeDtypeStruct(y.shape[:1], jnp.float32)
  if model.uses_forward_pass:
    out = jax.eval_shape(
      lambda w, b, m: model.forward_pass(w, b, False, rng=key, mask=m),
      model.initial_weights,
      batch,
      mask,
    )
    predictions = out.predictions
  else:
    predictions = jax.eval_shape(
      lambda w, x, m: model.predict_on_batch(w, x, False, rng=key, mask=m),
      model.initial_weights,
      models.split_batch(batch)[0],
      mask,
    )
  if not isinstance(predictions, jax.ShapeDtypeStruct):
    return None
  shape = tuple(predictions.shape)
  if len(shape) != len(y.shape) + 1 or shape[:-1] != tuple(y.shape) or shape[-1] < 2:
    return None
  return int(shape[-1])


def is_concrete(tree: Any) -> bool:
  """Whether every leaf of `tree` is a host value or an untraced array this process holds whole
  (so a host-side check can read it: never a tracer, never another process's shard)."""
  for leaf in jax.tree.leaves(tree):
    if isinstance(leaf, jax.core.Tracer):
      return False
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      return False
  return True


def check_labels(client_batches: Any, num_classes: int) -> None:
  """Raises a ValueError naming the first client (its cohort position and client id) whose
  real examples (mask > 0) hold a label outside `[0, num_classes)`. Host-side: call it on
  concrete data only (`is_concrete`), before a round is dispatched."""
  _, labels = models.split_batch(client_batches.batch)
  labels = np.asarray(labels)
  mask = np.asarray(client_batches.mask) > 0
  mask = mask.reshape(mask.shape + (1,) * (labels.ndim - mask.ndim))
  bad = ((labels < 0) | (labels >= num_classes)) & mask
  if not bad.any():
    return
  position = np.argwhere(bad)[0]
  client = int(position[0])
  ids = client_batches.client_ids
  name = f'client {client} of the cohort'
  if ids is not None:
    name += f' (client id {int(np.asarray(ids)[client])})'
  raise ValueError(
    f'client_batches: {name} has label {labels[tuple(position)]} at step {int(position[1])}, '
    f'example {int(position[2])} ({int(bad[client].sum())} such labels in that client, '
    f'{int(bad.any(axis=tuple(range(1, bad.ndim))).sum())} such clients); the model predicts '
    f'{num_classes} classes, so labels must be class indices in [0, {num_classes}). A label '
    'outside them trains to a NaN loss without an error. Tip: build the model with as many '
    'classes as the data has (the largest label + 1), or drop the bad examples; '
    'fl.data.batch_cohort(..., num_classes=) checks labels where the data enters.'
  )


def client_data_check(model: models.FunctionalModel) -> Callable[[Any], None] | None:
  """The host-side check of a `ClientWorkProcess` over `model` (`check_client_data`): labels
  against the classes of a classifier (`model_num_classes`); None when there is nothing to
  check. It skips traced or non-addressable data (`is_concrete`)."""
  num_classes = model_num_classes(model)
  if num_classes is None:
    return None

  def check(client_batches):
    if isinstance(client_batches, _client_batches.ClientBatches) and is_concrete(
      (client_batches.batch, client_batches.mask)
    ):
      check_labels(client_batches, num_classes)

  return check


def _check_client_inputs(client_inputs: Any, num_clients: int) -> None:
  for path, leaf in jax.tree_util.tree_flatten_with_path(client_inputs)[0]:
    if not jnp.shape(leaf)[:1] == (num_clients,):
      raise ValueError(
        f'client_inputs leaf {tree_lib.keystr(path)} has shape {jnp.shape(leaf)}; expected a '
        f'leading client axis of {num_clients}, one slice per client of client_batches'
      )


def _takes_broadcast(client_loop_fn: Callable) -> bool:
  """Whether `client_loop_fn` takes a third positional argument, the round's broadcast."""
  try:
    inspect.signature(client_loop_fn).bind(None, None, None)
  except TypeError:
    return False
  return True


def build_client_work(
  model: models.FunctionalModel,
  client_loop_fn: Callable[..., ClientLoop],
  hparams: Any = None,
  *,
  client_weighting: ClientWeighting | Callable = ClientWeighting.NUM_EXAMPLES,
  metrics_aggregator: Callable | None = None,
  evaluation: bool = False,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.ClientWorkProcess:
  """Turns a per-client description into a `ClientWorkProcess` that runs a whole cohort.

  `client_loop_fn(model_weights, hparams) -> ClientLoop` is called once per round (at trace
  time) with the broadcast weights and the hyperparameters in state; the `ClientLoop` it
  returns is written for one client. A `client_loop_fn(model_weights, hparams, broadcast)` of
  three parameters also gets the round's broadcast value, `next(..., broadcast=)`: a server
  quantity every client reads (FedJAX's `shared_input`: a control variate, a frozen optimizer
  state, a scheduled learning rate), so `hparams` holds only numbers a user tunes. A per-client
  `ClientOutput.client_sum` is summed over the clients that take part, inside the loop, and
  comes back as the result's `client_sum` (for the algorithm's server-side update).

  The builder owns the rest: input checks, keys (per round, per client id, per step), the
  chunked and vmapped cohort loop (`_cohort.run_clients`, sharded over `mesh`), the metrics
  (`loss`, `num_examples` and the model's, counted from each step's `step_metrics`, then
  reported by `model.report_local_outputs` of `ClientOutput.model_weights` once per client),
  client weighting, non-finite exclusion (a client whose update, client sum or weight is not
  finite sends a zero update with weight 0 and its metrics are dropped), and the host-side
  label check of a classifier (`check_client_data`, run on concrete data only).

  Padding is invisible (the semantics of a client without examples): a client takes part in
  the aggregation only when it holds at least one real example (mask > 0) and its update and
  weight are finite. Padding added to fill a chunk, a device or a process block has no example,
  so it takes no part; nor does a real client with no example (it contributes nothing and
  breaks nothing; docs/ARCHITECTURE.md): the two cannot be told apart in the data and are
  treated alike. Such a client sends a zero update of weight 0, its aggregator contribution
  is not summed (an unweighted mean does not count it), and stacked aggregators get it masked
  out (`ClientResult.client_mask`). It still gets its per-client output (e.g. its unchanged local
  state), its metric state (zero counts; `report_local_outputs` of the weights it was sent, as
  TFF reports them) and counts in `non_finite_clients` when its update was not finite.

  Example: FedProx's local step (Li et al., 2020) in a few lines.
    >>> def prox_loop(weights, hparams):
    ...   w0 = weights.trainable
    ...   def step(w, batch, mask, key):
    ...     grads, step_metrics = fl.templates.masked_grad(model, weights._replace(
    ...         trainable=w), batch, mask)
    ...     grads = jax.tree.map(lambda g, w, w0: g + hparams['mu'] * (w - w0), grads, w, w0)
    ...     return jax.tree.map(lambda w, g: w - hparams['lr'] * g, w, grads), step_metrics
    ...   return fl.templates.ClientLoop(lambda inputs, key: w0, step,
    ...       lambda w: fl.templates.ClientOutput(update=fl.tree.tree_sub(w0, w)))
    >>> work = fl.templates.build_client_work(model, prox_loop, {'mu': 0.1, 'lr': 0.05})

  Args:
    model: the `FunctionalModel` whose `input_spec` checks the data and whose metrics count.
    client_loop_fn: `(model_weights, hparams) -> ClientLoop`, or `(model_weights, hparams,
      broadcast) -> ClientLoop`.
    hparams: pytree (nested dicts) of numbers kept in state; `set_hparams` replaces them
      without recompiling.
    client_weighting: `ClientWeighting` or `(client metrics) -> [] weight`.
    metrics_aggregator: `(finalize) -> (client metric states [clients, ...]) -> metrics`;
      default `fl.metrics.sum_then_finalize`, which streams (states summed in the loop).
    evaluation: report `{'eval': {'current_round_metrics', 'total_rounds_metrics'}}` (the
      state sums metric states over rounds) instead of training measurements; no update.
    client_chunk_size: clients vmapped together. `'auto'` (the default): measured the first
      time the round runs on a new shape, among a few candidates (`fl.templates.TunedNext`;
      a model that convolves or loops (a recurrent layer) runs one client per lane on a CPU,
      unmeasured); None: the
      backend's default (8 on a CPU, 256 on an accelerator); an int fixes it.
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: every device runs its own clients.
    seed: seeds the per-round keys.

  Returns:
    A streaming `ClientWorkProcess`: `next(state, model_weights, client_batches,
    client_inputs=(), *, client_part=None, broadcast=())`, measurements `{'train': {'loss',
    'num_examples', ...model metrics}, 'non_finite_clients': [] int32}` (training).
  """
  check_model(model)
  if not callable(client_loop_fn):
    raise TypeError(f'client_loop_fn must be callable; got {type(client_loop_fn).__name__}')
  check_client_weighting(client_weighting)
  _cohort.check_chunk_size(client_chunk_size)
  _cohort.check_mesh(mesh)
  stream_metrics = metrics_aggregator in (None, metrics_lib.sum_then_finalize)
  metric_init, metric_update, metric_finalize = training_metric_fns(model)
  aggregate_metrics = (metrics_aggregator or metrics_lib.sum_then_finalize)(metric_finalize)
  initial_hparams = {} if hparams is None else hparams
  if client_chunk_size in (None, _layout.AUTO) and _one_client_per_lane_on_cpu(model):
    client_chunk_size = _cohort.CPU_ONE_LANE_CHUNK  # nothing to measure: one client per lane wins
  check_data = client_data_check(model)
  takes_broadcast = _takes_broadcast(client_loop_fn)

  def initialize():
    reported = report_client_metrics(model, metric_init(), model.initial_weights)
    totals = tree_lib.tree_zeros_like(reported) if evaluation else ()
    return tree_lib.tree_strong_types(
      ClientWorkState(initial_hparams, jax.random.PRNGKey(seed), totals)
    )

  def next_fn(
    state, model_weights, client_batches, client_inputs=(), *, client_part=None, broadcast=()
  ):
    _client_batches.check_client_batches(client_batches, model.input_spec)
    if check_data is not None:
      check_data(client_batches)
    num_clients = client_batches.mask.shape[0]
    _check_client_inputs(client_inputs, num_clients)
    # A client without a real example (padding to fill a process block, or an empty client)
    # takes no part in the aggregation: see `finalize`.
    has_examples = jnp.any(jnp.asarray(client_batches.mask) > 0, axis=(1, 2))
    round_key, next_key = jax.random.split(state.rng)
    if takes_broadcast:
      loop = client_loop_fn(model_weights, state.hparams, broadcast)
    elif jax.tree.leaves(broadcast):
      raise TypeError(
        'next got a broadcast value, but client_loop_fn takes (model_weights, hparams). Tip: '
        'give it a third parameter, (model_weights, hparams, broadcast), to read it.'
      )
    else:
      loop = client_loop_fn(model_weights, state.hparams)
    if not isinstance(loop, ClientLoop):
      raise TypeError(f'client_loop_fn must return a ClientLoop; got {type(loop).__name__}')

    def init(client_input, client_id):
      key = jax.random.fold_in(round_key, client_id)
      return loop.init(client_input[0], key), metric_init(), key

    def step(carry, batch, mask, step_index):
      inner, metric_state, key = carry
      inner, step_metrics = loop.step(inner, batch, mask, jax.random.fold_in(key, step_index))
      if step_metrics is not None:
        batch_output, labels = step_metrics
        metric_state = metric_update(metric_state, labels, batch_output, mask)
      return inner, metric_state, key

    def finalize(carry, client_input, client_id):
      has_data = client_input[1]
      inner, metric_state, _ = carry
      out = loop.finalize(inner)
      if not isinstance(out, ClientOutput):
        raise TypeError(f'ClientLoop.finalize must return a ClientOutput; got {type(out).__name__}')
      final_weights = model_weights if out.model_weights is None else out.model_weights
      metric_state = report_client_metrics(model, metric_state, final_weights)
      zeros = tree_lib.tree_zeros_like
      update, ok = out.update, jnp.array(True)
      weight = jnp.zeros((), jnp.float32)
      if not evaluation:
        num_examples = metric_state['builtin']['num_examples']
        weight = client_weight(client_weighting, num_examples, metric_finalize(metric_state))
        ok = tree_lib.tree_all_finite((update, out.client_sum)) & jnp.isfinite(weight)
      # Padding is invisible: a client takes part only with a real example and a finite update;
      # otherwise it sends a zero update of weight 0 and is left out of every aggregator (its
      # contribution is not summed, stacked aggregators get it masked out). Its metrics count
      # nothing but what `report_local_outputs` reports of the weights it was sent.
      takes_part = has_data & ok
      update = tree_lib.tree_where(takes_part, update, zeros(update))
      weight = jnp.where(takes_part, weight, 0.0)
      metric_state = tree_lib.tree_where(ok, metric_state, zeros(metric_state))
      # Metric states are summed in the loop unless a custom aggregator wants them stacked.
      summed = {
        'non_finite': (~ok).astype(jnp.int32),
        'client_sum': tree_lib.tree_where(takes_part, out.client_sum, zeros(out.client_sum)),
      }
      stacked = {'outputs': out.client_output}
      (summed if stream_metrics else stacked)['metrics'] = metric_state
      if client_part is None:
        stacked['result'] = (update, weight, takes_part)
      else:
        contribution = client_part(update, weight, client_id)
        summed['result'] = tree_lib.tree_where(takes_part, contribution, zeros(contribution))
      return summed, stacked

    summed, stacked = _cohort.run_clients(
      init,
      step,
      finalize,
      client_batches,
      (client_inputs, has_examples),
      client_chunk_size=client_chunk_size,
      mesh=mesh,
    )
    if stream_metrics:
      round_metrics = summed['metrics']
      metrics = metric_finalize(round_metrics)
    else:
      round_metrics = tree_lib.tree_sum_over_clients(stacked['metrics'])
      metrics = aggregate_metrics(stacked['metrics'])
    if client_part is None:
      update, weight, takes_part = stacked['result']
      result = _processes.ClientResult(
        update, weight, stacked['outputs'], takes_part, summed['client_sum']
      )
    else:
      result = _processes.StreamedClientResult(
        summed['result'], stacked['outputs'], summed['client_sum']
      )
    new_state = state._replace(rng=next_key)
    if evaluation:
      totals = tree_lib.tree_add(state.total_rounds_metrics, round_metrics)
      new_state = new_state._replace(total_rounds_metrics=totals)
      measurements = {
        'eval': {'current_round_metrics': metrics, 'total_rounds_metrics': metric_finalize(totals)}
      }
    else:
      measurements = {'train': metrics, 'non_finite_clients': summed['non_finite']}
    return _processes.MeasuredProcessOutput(new_state, result, measurements)

  return _processes.ClientWorkProcess(
    initialize,
    next_fn,
    get_hparams,
    set_hparams,
    streams=True,
    check_client_data=check_data,
    auto_chunk=client_chunk_size == _layout.AUTO,
    client_devices=1 if mesh is None else mesh.shape[_cohort.CLIENTS_AXIS],
  )


def wrap_client_work(
  inner: _processes.ClientWorkProcess,
  initialize: Callable[[], Any],
  next_fn: Callable[..., Any],
  get_hparams: Callable[[Any], Any],
  set_hparams: Callable[[Any, Any], Any],
) -> _processes.ClientWorkProcess:
  """A streaming client work built around `inner` (its state, its round, its hyperparameters:
  the functions given) that keeps `inner`'s chunk measurement and devices."""
  return _processes.ClientWorkProcess(
    initialize,
    next_fn,
    get_hparams,
    set_hparams,
    streams=True,
    auto_chunk=inner.auto_chunk,
    client_devices=inner.client_devices,
  )


def get_hparams(state: ClientWorkState) -> Any:
  """A copy of `state.hparams` (nested dicts of arrays)."""
  return jax.tree.map(lambda x: x, state.hparams)


def set_hparams(state: ClientWorkState, hparams: Any) -> ClientWorkState:
  """`state` with some hyperparameters replaced, each cast as it was (no retrace)."""
  return state._replace(hparams=optimizers.replace_hparams(state.hparams, hparams))


def model_delta_client_loop(
  model: models.FunctionalModel, optimizer: optax.GradientTransformation
) -> Callable[[models.ModelWeights, Any], ClientLoop]:
  """FedAvg's local training as a `client_loop_fn` for `build_client_work`.

  Each client starts from the broadcast weights with a fresh `optimizer` state whose
  hyperparameters are set from `hparams`, takes one step per batch and returns
  `update = initial.trainable - final.trainable`. Called inside another `client_loop_fn`, it
  trains with an optimizer built from the round's weights (FedProx chains a proximal term).
  """

  def client_loop(model_weights, hparams):
    initial = model_weights.trainable
    opt_state = optimizers.set_hparams(optimizer.init(initial), hparams)

    def init(client_input, key):
      del client_input, key
      return model_weights, opt_state

    def step(carry, batch, mask, key):
      weights, opt_state, step_metrics = optimizer_step(model, optimizer, *carry, batch, mask, key)
      return (weights, opt_state), step_metrics

    def finalize(carry):
      return ClientOutput(
        update=tree_lib.tree_sub(initial, carry[0].trainable), model_weights=carry[0]
      )

    return ClientLoop(init, step, finalize)

  return client_loop


def build_model_delta_client_work(
  model: models.FunctionalModel,
  optimizer: optax.GradientTransformation,
  client_weighting: ClientWeighting | Callable = ClientWeighting.NUM_EXAMPLES,
  metrics_aggregator: Callable | None = None,
  *,
  client_chunk_size: int | str | None = 'auto',
  mesh: Mesh | None = None,
  seed: int = 0,
) -> _processes.ClientWorkProcess:
  """Client work that trains the broadcast model locally and returns the model delta.

  Every client starts from the same weights with a fresh optimizer state, takes one optimizer
  step per batch over its (padded, masked) steps, and returns `update = initial.trainable -
  final.trainable`. Built on `build_client_work`, which owns the cohort loop, metrics and
  non-finite exclusion (counted in `measurements['non_finite_clients']`).

  Example:
    >>> work = build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
    >>> out = work.next(work.initialize(), model.initial_weights, client_batches)
    >>> out.result.update  # leaves [clients, ...]

  Args:
    model: the `FunctionalModel` to train.
    optimizer: client optimizer; its hyperparameters are this process's state.
    client_weighting: `ClientWeighting` or `(client metrics) -> [] weight`.
    metrics_aggregator: default `fl.metrics.sum_then_finalize`.
    client_chunk_size: clients vmapped together: `'auto'` (measured), None or an int (see
      `build_client_work`).
    mesh: optional `Mesh` with a `'clients'` axis (see `build_client_work`).
    seed: seeds the per-round keys passed to models that take an `rng`.
  """
  check_model(model)
  check_optimizer(optimizer, 'optimizer')
  return build_client_work(
    model,
    model_delta_client_loop(model, optimizer),
    optimizers.get_hparams(optimizer.init(model.initial_weights.trainable)),
    client_weighting=client_weighting,
    metrics_aggregator=metrics_aggregator,
    client_chunk_size=client_chunk_size,
    mesh=mesh,
    seed=seed,
  )
