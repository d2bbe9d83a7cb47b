"""The public client-work building block: custom client works, per-client inputs and outputs,
randomness keyed by client id, streaming and stacked aggregation, memory flat in the cohort."""

import jax
import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [9, 2, 14, 5, 0, 7]


def _batches(sizes=SIZES, **kwargs):
  return fl.data.build_client_batches(ref.random_clients(sizes), batch_size=4, **kwargs)


def _fed_prox_work(model, learning_rate, mu):
  """FedProx's local objective F(w) + mu/2 |w - w0|^2, written only with the public API."""

  def client_loop(weights, hparams):
    w0 = weights.trainable

    def init(client_input, key):
      return w0

    def step(w, batch, mask, key):
      grads, step_metrics = fl.templates.masked_grad(
        model, weights._replace(trainable=w), batch, mask
      )
      grads = jax.tree.map(lambda g, w, w0: g + hparams['mu'] * (w - w0), grads, w, w0)
      return jax.tree.map(lambda w, g: w - hparams['learning_rate'] * g, w, grads), step_metrics

    def finalize(w):
      return fl.templates.ClientOutput(update=jax.tree.map(jnp.subtract, w0, w))

    return fl.templates.ClientLoop(init, step, finalize)

  hparams = {'learning_rate': jnp.float32(learning_rate), 'mu': jnp.float32(mu)}
  return fl.templates.build_client_work(model, client_loop, hparams, client_chunk_size=2)


def _fed_prox_reference(w, b, client_batches, lr, mu):
  """Numpy FedProx round (server SGD 1.0, example-weighted mean of the deltas)."""
  deltas, weights = [], []
  for c in range(client_batches.mask.shape[0]):
    cw, cb, n = w.copy(), b.copy(), 0
    for x, y in ref.real_batches(client_batches, c):
      _, gw, gb, _ = ref.loss_and_grads(cw, cb, x, y)
      cw, cb = cw - lr * (gw + mu * (cw - w)), cb - lr * (gb + mu * (cb - b))
      n += len(y)
    deltas.append((w - cw, b - cb))
    weights.append(n)
  total = sum(weights)
  dw = sum(n * d[0] for n, d in zip(weights, deltas, strict=True)) / total
  db = sum(n * d[1] for n, d in zip(weights, deltas, strict=True)) / total
  return w - dw, b - db


def _compose(model, client_work, aggregator=None):
  spec = fl.tree.tree_specs(model.initial_weights)
  return fl.templates.compose_learning_process(
    lambda: model.initial_weights,
    fl.templates.build_broadcast_process(spec),
    client_work,
    (aggregator or fl.aggregators.MeanFactory()).create(spec.trainable),
    fl.templates.build_apply_optimizer_finalizer(fl.optimizers.build_sgdm(1.0), spec),
  )


def test_a_custom_client_work_from_the_public_api_matches_numpy():
  model = ref.linear_model(5, 3)
  batches = _batches(num_epochs=2)
  process = _compose(model, _fed_prox_work(model, 0.1, 0.5))
  state = process.initialize()
  w, b = (np.asarray(model.initial_weights.trainable[k], np.float64) for k in ('w', 'b'))
  for _ in range(2):
    state, metrics = process.next(state, batches)
    w, b = _fed_prox_reference(w, b, batches, 0.1, 0.5)
  got = process.get_model_weights(state).trainable
  np.testing.assert_allclose(got['w'], w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['b'], b, rtol=1e-5, atol=1e-6)
  assert int(metrics['client_work']['train']['num_examples']) == 2 * sum(SIZES)
  # The proximal strength is a hyperparameter in state; mu = 0 is FedAvg.
  state = process.set_hparams(process.initialize(), {'client_work': {'mu': 0.0}})
  state, _ = process.next(state, batches)
  w0, b0 = (np.asarray(model.initial_weights.trainable[k], np.float64) for k in ('w', 'b'))
  want_w, _, _ = ref.fed_avg_round(w0, b0, batches, 0.1)
  np.testing.assert_allclose(process.get_model_weights(state).trainable['w'], want_w, atol=1e-6)


def test_streaming_and_stacked_aggregation_agree():
  """A round streamed through the cohort loop equals the stacked round (a plain next)."""
  model = ref.linear_model(5, 3)
  batches = _batches(num_epochs=2)
  work = fl.templates.build_model_delta_client_work(
    model, fl.optimizers.build_sgdm(0.1), client_chunk_size=2
  )
  streamed = _compose(model, work)
  stacked = _compose(model, work._replace(streams=False))
  s1, m1 = streamed.next(streamed.initialize(), batches)
  s2, m2 = stacked.next(stacked.initialize(), batches)
  for a, b in zip(jax.tree.leaves((s1, m1)), jax.tree.leaves((s2, m2)), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _median_factory():
  """A user's aggregator that needs every client at once: coordinate-wise median."""

  class MedianFactory:
    def create(self, value_spec):
      def next_fn(state, value):
        median = jax.tree.map(lambda x: jnp.median(x, axis=0), value)
        return fl.templates.MeasuredProcessOutput(state, median, {})

      return fl.templates.AggregationProcess(lambda: (), next_fn, False, value_spec=value_spec)

  return MedianFactory()


def test_an_aggregator_that_needs_every_client_gets_stacked_values():
  model = ref.linear_model(5, 3)
  batches = _batches([9, 2, 14, 5, 7])
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), model_aggregator=_median_factory()
  )
  state, _ = process.next(process.initialize(), batches)
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
  deltas = work.next(work.initialize(), model.initial_weights, batches).result.update
  want = model.initial_weights.trainable['w'] - np.median(deltas['w'], axis=0)
  np.testing.assert_allclose(process.get_model_weights(state).trainable['w'], want, atol=1e-6)


def test_nested_mean_factory_with_a_stacked_inner_sum_equals_the_streamed_mean():
  class PlainSum:
    def create(self, value_spec):
      def next_fn(state, value):
        return fl.templates.MeasuredProcessOutput(state, fl.tree.tree_sum_over_clients(value), {})

      return fl.templates.AggregationProcess(lambda: (), next_fn, False)

  model = ref.linear_model(5, 3)
  batches = _batches()
  opt = fl.optimizers.build_sgdm(0.1)
  streamed = fl.algorithms.build_weighted_fed_avg(model, opt)
  nested = fl.aggregators.MeanFactory(value_sum_factory=PlainSum())
  assert not nested.create(model.initial_weights.trainable).streams
  stacked = fl.algorithms.build_weighted_fed_avg(model, opt, model_aggregator=nested)
  s1, m1 = streamed.next(streamed.initialize(), batches)
  s2, m2 = stacked.next(stacked.initialize(), batches)
  for a, b in zip(jax.tree.leaves(s1), jax.tree.leaves(s2), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    m1['aggregator']['total_weight'], m2['aggregator']['total_weight'], rtol=1e-6
  )


def _noise_work(model):
  """Per-client output: a draw from the client's key, and the client's input echoed."""

  def client_loop(weights, hparams):
    def init(client_input, key):
      return jax.random.normal(key, (3,)), client_input

    def step(carry, batch, mask, key):
      return carry, None

    def finalize(carry):
      noise, client_input = carry
      return fl.templates.ClientOutput(update=(), client_output=(noise, client_input))

    return fl.templates.ClientLoop(init, step, finalize)

  return fl.templates.build_client_work(model, client_loop, evaluation=True, client_chunk_size=2)


def test_a_clients_randomness_follows_its_id_not_its_position():
  model = ref.linear_model(5, 3)
  work = _noise_work(model)
  batches = _batches([3, 5, 2, 4, 6])
  ids = np.array([11, 22, 33, 44, 55], np.uint32)
  inputs = np.arange(5, dtype=np.float32) * 10
  batches = batches._replace(client_ids=ids)
  perm = np.array([3, 0, 4, 2, 1])
  permuted = fl.ClientBatches(
    jax.tree.map(lambda x: x[perm], batches.batch), batches.mask[perm], ids[perm]
  )
  state = work.initialize()
  out = work.next(state, model.initial_weights, batches, inputs).result.client_outputs
  out_p = work.next(state, model.initial_weights, permuted, inputs[perm]).result.client_outputs
  np.testing.assert_array_equal(out_p[0], np.asarray(out[0])[perm])
  np.testing.assert_array_equal(out_p[1], inputs[perm])  # per-client inputs come back in order
  assert len({tuple(np.asarray(row)) for row in out[0]}) == 5  # every client draws its own


def test_dropout_clients_train_the_same_wherever_they_sit():
  model = ref.dropout_linear_model(5, 3)
  clients = ref.random_clients([6, 3, 9])
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.5))
  state = process.initialize()
  make = lambda order: fl.data.build_client_batches(
    [clients[i] for i in order], batch_size=4, client_keys=[100 + i for i in order]
  )
  w1 = process.get_model_weights(process.next(state, make([0, 1, 2]))[0]).trainable
  w2 = process.get_model_weights(process.next(state, make([2, 0, 1]))[0]).trainable
  np.testing.assert_allclose(w1['w'], w2['w'], rtol=1e-5, atol=1e-6)
  other = fl.data.build_client_batches(clients, batch_size=4, client_keys=[7, 8, 9])
  w3 = process.get_model_weights(process.next(state, other)[0]).trainable
  assert not np.allclose(w1['w'], w3['w'], atol=1e-4)  # the ids really key the dropout


def test_client_inputs_must_have_a_client_axis():
  model = ref.linear_model(5, 3)
  work = _noise_work(model)
  with pytest.raises(ValueError, match=r'client_inputs leaf .* leading client axis of 6'):
    work.next(work.initialize(), model.initial_weights, _batches(), np.zeros(5, np.float32))


def test_client_work_rejects_a_loop_fn_that_returns_something_else():
  model = ref.linear_model(5, 3)
  work = fl.templates.build_client_work(model, lambda weights, hparams: (1, 2, 3))
  with pytest.raises(TypeError, match='client_loop_fn must return a ClientLoop; got tuple'):
    work.next(work.initialize(), model.initial_weights, _batches())


def _round_temp_bytes(process, input_spec, num_clients, steps, batch_size):
  """XLA's compiled temporary bytes of one round, lowered from abstract shapes only."""
  state = jax.eval_shape(process.initialize)
  spec = fl.data.client_batches_spec(input_spec, num_clients, steps, batch_size)
  return process.next.lower(state, spec).compile().memory_analysis().temp_size_in_bytes


def test_round_memory_is_set_by_the_chunk_not_the_cohort():
  """Compiled temporaries of a FedAvg round (MLP 784-200-200-62, 4 steps of 16): 4,096 clients
  within 1.5x of 256 at the same chunk. Stacked updates would need 4,096 x 0.8 MB = 3.4 GB."""
  model = fl.models.mlp_classifier(784, 62, hidden=(200, 200))
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), client_chunk_size=8
  )
  small = _round_temp_bytes(process, model.input_spec, 256, 4, 16)
  large = _round_temp_bytes(process, model.input_spec, 4096, 4, 16)
  update_bytes = 4 * sum(x.size for x in jax.tree.leaves(model.initial_weights.trainable))
  assert large <= 1.5 * small, (small, large)
  assert large < 4096 * update_bytes / 10  # far below one stored update per client


def test_clients_without_an_example_or_a_finite_update_take_no_part():
  """Padding is invisible: a client with no example (padding or an empty client) or a non-finite
  update has weight 0 whatever the weighting, and `client_mask` False for stacked aggregators."""
  model = ref.linear_model(5, 3)
  clients = ref.random_clients([3, 0, 5, 4])
  clients[3]['x'][0, 0] = np.nan  # a non-finite update
  batches = fl.data.build_client_batches(clients, batch_size=4)
  work = fl.templates.build_model_delta_client_work(
    model, fl.optimizers.build_sgdm(0.1), client_weighting=lambda metrics: 1.0
  )
  out = work.next(work.initialize(), model.initial_weights, batches)
  np.testing.assert_array_equal(out.result.client_mask, [True, False, True, False])
  np.testing.assert_array_equal(out.result.update_weight, [1.0, 0.0, 1.0, 0.0])
  for leaf in jax.tree.leaves(out.result.update):
    np.testing.assert_array_equal(np.asarray(leaf)[[1, 3]], 0.0)
  assert int(out.measurements['non_finite_clients']) == 1
  # A callable weighting that gives an empty client weight 1 no longer dilutes the mean.
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.1), client_weighting=lambda metrics: 1.0
  )
  state, _ = process.next(process.initialize(), _batches([3, 0, 5]))
  w0, b0 = (np.asarray(model.initial_weights.trainable[k], np.float64) for k in ('w', 'b'))
  want_w, _, _ = ref.fed_avg_round(w0, b0, _batches([3, 0, 5]), 0.1, weighting='uniform')
  np.testing.assert_allclose(process.get_model_weights(state).trainable['w'], want_w, atol=1e-6)


def _labelled_batches(bad_label):
  clients = ref.random_clients([6, 5, 7])
  clients[1]['y'][3] = bad_label
  return fl.data.build_client_batches(clients, batch_size=4, client_keys=[40, 41, 42])


@pytest.mark.parametrize('bad_label', [3, 7, -1])
def test_a_label_outside_the_models_classes_is_refused_before_the_round(bad_label):
  model = ref.linear_model(5, 3)
  batches = _labelled_batches(bad_label)
  match = (
    rf'client 1 of the cohort \(client id 41\) has label {bad_label} .*the model predicts 3 '
    r'classes, so labels must be class indices in \[0, 3\).*Tip:'
  )
  for process in [
    fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1)),
    fl.algorithms.build_unweighted_fed_avg(model, fl.optimizers.build_sgdm(0.1)),
    fl.algorithms.build_fed_eval(model),
  ]:
    with pytest.raises(ValueError, match=match):
      process.next(process.initialize(), batches)
  work = fl.templates.build_model_delta_client_work(model, fl.optimizers.build_sgdm(0.1))
  with pytest.raises(ValueError, match=match):
    work.next(work.initialize(), model.initial_weights, batches)


def test_the_label_check_reads_only_real_examples_and_keeps_the_compiled_round():
  model = ref.linear_model(5, 3)
  process = fl.algorithms.build_weighted_fed_avg(model, fl.optimizers.build_sgdm(0.1))
  batches = _labelled_batches(2)
  junk = batches._replace(batch={**batches.batch, 'y': batches.batch['y'].copy()})
  junk.batch['y'][np.asarray(junk.mask) == 0] = 99  # padded examples: never read
  state, metrics = process.next(process.initialize(), junk)
  assert np.isfinite(float(metrics['client_work']['train']['loss']))
  state, _ = process.next(state, batches)
  assert process.next._cache_size() == 1  # the check runs on the host: one program
  with pytest.raises(ValueError, match='has label 5'):  # untraced device arrays: checked too
    process.next(state, jax.device_put(_labelled_batches(5)))
  # Traced data cannot be read: under an outer jit the round runs unchecked, as it did; a driver
  # that re-jits `next` runs the check first.
  jax.jit(process.next)(state, _labelled_batches(5))
  with pytest.raises(ValueError, match='has label 5'):
    process.next.check_client_data(_labelled_batches(5))


@pytest.mark.parametrize(
  ('predictions', 'label_dtype', 'label_shape', 'want'),
  [
    ((4, 3), jnp.int32, (4,), 3),  # a classifier
    ((4, 2, 7), jnp.int32, (4, 2), 7),  # a sequence classifier
    ((4, 3), jnp.float32, (4,), None),  # float labels: regression
    ((4, 1), jnp.int32, (4,), None),  # one logit (a binary label, not an index)
    ((4,), jnp.int32, (4,), None),  # a prediction per label (regression on integers)
    ((4, 3), jnp.int32, (4, 3), None),  # labels shaped like predictions (multi-label)
  ],
)
def test_only_classifiers_have_their_labels_checked(predictions, label_dtype, label_shape, want):
  model = fl.FunctionalModel(
    initial_weights=fl.ModelWeights({'w': jnp.zeros(predictions[1:])}, ()),
    predict_on_batch_fn=lambda weights, x, training=True: weights.trainable['w'] + x,
    loss_fn=fl.models.mean_squared_error,
    input_spec={
      'x': jax.ShapeDtypeStruct((None, *predictions[1:]), jnp.float32),
      'y': jax.ShapeDtypeStruct((None, *label_shape[1:]), label_dtype),
    },
  )
  assert fl.templates._client_work.model_num_classes(model) == want
  check = fl.templates._client_work.client_data_check(model)
  assert (check is None) == (want is None)
