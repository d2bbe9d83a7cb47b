"""Personalization evaluation: fine-tune the global model on part of each client's data with
named strategies, evaluate on the rest, against the global model on the same part (TFF's
`tff.learning.algorithms.build_personalization_eval_computation`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh

from fedjax_lite import metrics as metrics_lib
from fedjax_lite import models, optimizers
from fedjax_lite.data import _client_batches
from fedjax_lite.templates import _client_work

BASELINE = 'baseline_metrics'


class Personalization(NamedTuple):
  """A personalization strategy: fine-tune the global model on a client's train batches.

  Attributes:
    fine_tune: an optax optimizer (fresh state per client, one step per train batch) or a
      `client_loop_fn` `(model_weights, hparams={}) -> ClientLoop` whose `finalize` returns
      `ClientOutput(model_weights=<the fine-tuned weights>)`.
    num_epochs: passes over the train batches, an int >= 1.
  """

  fine_tune: optax.GradientTransformation | Callable
  num_epochs: int = 1


class PersonalizationEvalOutput(NamedTuple):
  """What a personalization evaluation returns.

  Attributes:
    metrics: `{'baseline_metrics': m, <strategy name>: m, ...}`, each `m` the metrics
      aggregator's output over all clients (default: `loss` and the model's metrics averaged
      over test examples, `num_examples` summed).
    client_metrics: the same tree, each client's own metrics, leaves `[k]` for the first
      `k = min(max_num_clients, clients)` clients of the cohort, in cohort order.
  """

  metrics: dict
  client_metrics: dict


def _check_strategy(name: Any, value: Any) -> Personalization:
  if not isinstance(name, str):
    raise TypeError(f'personalize_fns keys must be strings; got {name!r}')
  if name == BASELINE:
    raise ValueError(f'personalize_fns must not use the key {BASELINE!r}: it names the baseline')
  if isinstance(value, optax.GradientTransformation):
    value = Personalization(value)
  if not isinstance(value, Personalization):
    raise TypeError(
      f'personalize_fns[{name!r}] must be a Personalization or an optax.GradientTransformation; '
      f'got {type(value).__name__}'
    )
  if not (isinstance(value.fine_tune, optax.GradientTransformation) or callable(value.fine_tune)):
    raise TypeError(
      f'personalize_fns[{name!r}].fine_tune must be an optax.GradientTransformation or a '
      f'client_loop_fn; got {type(value.fine_tune).__name__}'
    )
  epochs = value.num_epochs
  if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
    raise ValueError(f'personalize_fns[{name!r}].num_epochs must be an int >= 1; got {epochs!r}')
  return value


def _fine_tune_loop(name: str, client_loop_fn: Callable) -> Callable:
  """`client_loop_fn` whose clients return their fine-tuned weights as per-client outputs."""

  def client_loop(model_weights, hparams):
    loop = client_loop_fn(model_weights, hparams)

    def finalize(carry):
      out = loop.finalize(carry)
      if out.model_weights is None:
        raise TypeError(
          f'personalize_fns[{name!r}]: ClientLoop.finalize must return '
          'ClientOutput(model_weights=<the fine-tuned weights>); got model_weights=None'
        )
      return _client_work.ClientOutput(
        client_output=out.model_weights, model_weights=out.model_weights
      )

    return loop._replace(finalize=finalize)

  return client_loop


def _evaluation_loop(evaluate_fn: Callable, personalized: bool) -> Callable:
  """Forward-only `client_loop_fn`: each client evaluates the weights it is handed as its input
  (`personalized`: its fine-tuned `ModelWeights`) or the broadcast model."""

  def client_loop(model_weights, hparams):
    del hparams

    def weights(carry):
      return carry if personalized else model_weights

    def step(carry, batch, mask, key):
      del key
      return carry, evaluate_fn(weights(carry), batch, mask)

    return _client_work.ClientLoop(
      lambda client_input, key: client_input,
      step,
      lambda carry: _client_work.ClientOutput(model_weights=weights(carry)),
    )

  return client_loop


def _repeat_epochs(
  batches: _client_batches.ClientBatches, num_epochs: int
) -> _client_batches.ClientBatches:
  """The step axis repeated `num_epochs` times: `[clients, num_epochs * steps, ...]`. A client's
  padded steps between its epochs change nothing (the cohort loop skips no real step)."""
  repeat = lambda x: jnp.concatenate([x] * num_epochs, axis=1)
  return batches._replace(batch=jax.tree.map(repeat, batches.batch), mask=repeat(batches.mask))


def _check_same_clients(
  train_batches: _client_batches.ClientBatches, test_batches: _client_batches.ClientBatches
) -> None:
  """Raises a ValueError unless both cohorts name the same client at every position.

  Checked when both carry `client_ids` and they are concrete on this host (not traced inside a
  caller's jit, nor spread over processes). A position with no example on either side is
  padding (e.g. the empty clients that fill a multi-process cohort): its ids are not compared.
  """
  ids = (train_batches.client_ids, test_batches.client_ids)
  if any(
    x is None or isinstance(x, jax.core.Tracer) or not getattr(x, 'is_fully_addressable', True)
    for x in ids
  ):
    return
  train_ids, test_ids = (np.asarray(jax.device_get(x)) for x in ids)
  differ = np.flatnonzero(train_ids != test_ids)
  if not differ.size:
    return
  masks = (train_batches.mask, test_batches.mask)
  if any(isinstance(m, jax.core.Tracer) for m in masks):
    return
  has_data = [np.asarray(jax.device_get(m))[differ].reshape(len(differ), -1).any(1) for m in masks]
  differ = differ[has_data[0] | has_data[1]]
  if differ.size:
    i = int(differ[0])
    raise ValueError(
      f'train_batches and test_batches hold different clients at position {i}: '
      f'train_batches.client_ids[{i}] is {int(train_ids[i])} and test_batches.client_ids[{i}] '
      f'is {int(test_ids[i])} ({differ.size} of {len(train_ids)} positions differ); expected '
      'the same clients in the same order, since each client is fine-tuned on its train part '
      'and evaluated on its own test part. Tip: batch both parts from one list of client ids.'
    )


def _with_client_metrics(metrics_aggregator: Callable | None, max_num_clients: int) -> Callable:
  """A metrics aggregator returning `(aggregate, the first clients' own finalized metrics)`."""
  aggregator = metrics_aggregator or metrics_lib.sum_then_finalize

  def make(finalize):
    aggregate = aggregator(finalize)

    def run(client_states):
      first = jax.tree.map(lambda x: x[:max_num_clients], client_states)
      return aggregate(client_states), jax.vmap(finalize)(first)

    return run

  return make


def build_personalization_eval(
  model: models.FunctionalModel,
  personalize_fns: Mapping[str, Personalization | optax.GradientTransformation],
  baseline_evaluate_fn: Callable | None = None,
  max_num_clients: int = 100,
  *,
  metrics_aggregator: Callable | None = None,
  client_chunk_size: int | None = None,
  mesh: Mesh | None = None,
  seed: int = 0,
) -> Callable:
  """Personalization evaluation, TFF's
  `tff.learning.algorithms.build_personalization_eval_computation`.

  For every client: evaluate the global model on its test batches (`'baseline_metrics'`); then,
  for each named strategy, fine-tune a copy of the global model on its train batches and
  evaluate that copy on the same test batches. All of it runs in one compiled call: one
  `fl.templates.build_client_work` pass evaluates the baseline and, per strategy, a training
  pass returns each client's fine-tuned weights (stacked `[clients, ...]`) which an
  evaluation pass takes as per-client inputs. Padded examples, steps and clients count in no
  metric.

  Departures from TFF: a client's data comes as two `ClientBatches` (TFF's `train_data` and
  `test_data`), already batched; strategies are `Personalization`s, not opaque functions, and
  are all evaluated alike; metrics come aggregated over every client (through
  `metrics_aggregator`) as well as per client, for the first `max_num_clients` clients of the
  cohort (TFF samples them at random; a cohort drawn at random makes its first clients such a
  sample, and the same every call).

  Example:
    >>> evaluate = fl.algorithms.build_personalization_eval(model, {
    ...     'sgd_lr_0.1': fl.algorithms.Personalization(fl.optimizers.build_sgdm(0.1), 2),
    ...     'adam': fl.optimizers.build_adam(1e-3)})
    >>> out = evaluate(trained_weights, train_batches, test_batches)
    >>> out.metrics['sgd_lr_0.1']['loss'] - out.metrics['baseline_metrics']['loss']

  Args:
    model: the `FunctionalModel` to evaluate.
    personalize_fns: strategy name -> `Personalization`, or an optax optimizer (one epoch).
    baseline_evaluate_fn: `(model_weights, batch, mask [batch_size]) -> (BatchOutput, labels)`
      on one padded batch; it measures the baseline and every personalized model. Default the
      model's forward pass with `training=False` (`fl.templates.masked_forward`).
    max_num_clients: clients whose own metrics come back in `client_metrics`, an int >= 0.
    metrics_aggregator: `(finalize) -> (client metric states) -> metrics`; default
      `fl.metrics.sum_then_finalize`.
    client_chunk_size: clients vmapped together.
    mesh: a `jax.sharding.Mesh` with a `'clients'` axis: each device runs its own clients.
    seed: seeds the clients' keys (a model's `rng` during fine-tuning).

  Returns:
    `evaluate(model_weights, train_batches, test_batches) -> PersonalizationEvalOutput`, one
    jitted program per shape (its `lower` and `_cache_size` are the program's); `train_batches`
    and `test_batches` hold the same clients in the same order (`[clients, steps, batch_size,
    ...]`, step counts may differ). Before running, `evaluate` checks the client counts and,
    when both carry `client_ids`, that they match position by position (positions with no
    example on either side are padding, not compared), and raises a `ValueError` naming the
    first position that differs and both ids.
  """
  _client_work.check_model(model)
  if not isinstance(personalize_fns, Mapping) or not personalize_fns:
    raise TypeError(
      'personalize_fns must be a non-empty mapping of strategy name -> Personalization; got '
      f'{personalize_fns!r}'
    )
  strategies = {name: _check_strategy(name, value) for name, value in personalize_fns.items()}
  if baseline_evaluate_fn is None:

    def baseline_evaluate_fn(weights, batch, mask):
      return _client_work.masked_forward(model, weights, batch, mask, False)[1]

  elif not callable(baseline_evaluate_fn):
    raise TypeError(
      f'baseline_evaluate_fn must be callable; got {type(baseline_evaluate_fn).__name__}'
    )
  if isinstance(max_num_clients, bool) or not isinstance(max_num_clients, int):
    raise TypeError(f'max_num_clients must be an int >= 0; got {max_num_clients!r}')
  if max_num_clients < 0:
    raise ValueError(f'max_num_clients must be an int >= 0; got {max_num_clients!r}')

  options = dict(client_chunk_size=client_chunk_size, mesh=mesh, seed=seed)
  eval_options = dict(
    options,
    metrics_aggregator=_with_client_metrics(metrics_aggregator, max_num_clients),
    evaluation=True,
  )
  baseline = _client_work.build_client_work(
    model, _evaluation_loop(baseline_evaluate_fn, False), **eval_options
  )
  personalized = _client_work.build_client_work(
    model, _evaluation_loop(baseline_evaluate_fn, True), **eval_options
  )
  fine_tunes = {}
  for name, strategy in strategies.items():
    loop_fn, hparams = strategy.fine_tune, None
    if isinstance(loop_fn, optax.GradientTransformation):
      hparams = optimizers.get_hparams(loop_fn.init(model.initial_weights.trainable))
      loop_fn = _client_work.model_delta_client_loop(model, loop_fn)
    fine_tunes[name] = _client_work.build_client_work(
      model, _fine_tune_loop(name, loop_fn), hparams, **options
    )

  def check(train_batches, test_batches):
    for name, batches in (('train_batches', train_batches), ('test_batches', test_batches)):
      _client_batches.check_client_batches(batches, model.input_spec, name)
    if train_batches.mask.shape[0] != test_batches.mask.shape[0]:
      raise ValueError(
        f'train_batches has {train_batches.mask.shape[0]} clients and test_batches '
        f'{test_batches.mask.shape[0]}; expected the same clients in the same order'
      )

  @jax.jit
  def run(model_weights, train_batches, test_batches):
    check(train_batches, test_batches)
    outputs = {BASELINE: baseline.next(baseline.initialize(), model_weights, test_batches)}
    for name, work in fine_tunes.items():
      repeated = _repeat_epochs(train_batches, strategies[name].num_epochs)
      tuned = work.next(work.initialize(), model_weights, repeated).result.client_outputs
      outputs[name] = personalized.next(
        personalized.initialize(), model_weights, test_batches, tuned
      )
    results = {k: out.measurements['eval']['current_round_metrics'] for k, out in outputs.items()}
    return PersonalizationEvalOutput(
      {k: r[0] for k, r in results.items()}, {k: r[1] for k, r in results.items()}
    )

  def evaluate(model_weights, train_batches, test_batches):
    check(train_batches, test_batches)  # the ids' values are known here, not inside `run`
    _check_same_clients(train_batches, test_batches)
    return run(model_weights, train_batches, test_batches)

  evaluate.lower, evaluate._cache_size = run.lower, run._cache_size
  return evaluate
