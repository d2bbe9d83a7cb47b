"""Personalization evaluation against a numpy loop: fine-tune each client on its train part,
evaluate on its test part, aggregate."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

TRAIN_SIZES = [7, 0, 13, 3, 9]
TEST_SIZES = [5, 9, 0, 2, 6]
MAX_CLIENTS = 3


def _batches(num_steps=None):
  train = ref.random_clients(TRAIN_SIZES, seed=1)
  test = ref.random_clients(TEST_SIZES, seed=2)
  return (
    fl.data.build_client_batches(train, batch_size=4, num_steps=num_steps),
    fl.data.build_client_batches(test, batch_size=3, num_steps=num_steps),
  )


def _bias_only(model, lr):
  """A custom fine-tuning `client_loop_fn`: SGD on the bias alone."""

  def client_loop(model_weights, hparams):
    def step(weights, batch, mask, key):
      grads, step_metrics = fl.templates.masked_grad(model, weights, batch, mask)
      trainable = {**weights.trainable, 'b': weights.trainable['b'] - lr * grads['b']}
      return weights._replace(trainable=trainable), step_metrics

    return fl.templates.ClientLoop(
      lambda client_input, key: model_weights,
      step,
      lambda weights: fl.templates.ClientOutput(model_weights=weights),
    )

  return client_loop


def _fine_tune(w, b, batches, client, lr, epochs=1, momentum=None, bias_only=False):
  vw, vb = np.zeros_like(w), np.zeros_like(b)
  for _ in range(epochs):
    for x, y in ref.real_batches(batches, client):
      _, gw, gb, _ = ref.loss_and_grads(w, b, x, y)
      gw = 0 * gw if bias_only else gw
      vw, vb = (momentum or 0.0) * vw + gw, (momentum or 0.0) * vb + gb
      w, b = w - lr * vw, b - lr * vb
  return w, b


def _evaluate(w, b, batches, client, scale=1.0):
  """`(loss sum, correct, examples)` of one client's test part."""
  loss_sum = correct = n = 0
  for x, y in ref.real_batches(batches, client):
    loss, _, _, right = ref.loss_and_grads(w, b, scale * x, y)
    loss_sum, correct, n = loss_sum + loss * len(y), correct + right, n + len(y)
  return loss_sum, correct, n


def _metrics(per_client):
  total = np.array(per_client, np.float64).sum(axis=0)
  return {'loss': total[0] / total[2], 'accuracy': total[1] / total[2], 'num_examples': total[2]}


def _assert_metrics(got, expected):
  assert int(got['num_examples']) == expected['num_examples']
  for name in ('loss', 'accuracy'):
    np.testing.assert_allclose(float(got[name]), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('chunk', [None, 2])
def test_personalization_eval_equals_numpy_loop(chunk):
  model = ref.linear_model(5, 3)
  strategies = {
    'sgd_lr_0.1_2_epochs': fl.algorithms.Personalization(fl.optimizers.build_sgdm(0.1), 2),
    'sgdm': fl.optimizers.build_sgdm(0.05, momentum=0.9),
    'bias_only': fl.algorithms.Personalization(_bias_only(model, 0.2)),
  }
  reference = {
    'sgd_lr_0.1_2_epochs': dict(lr=0.1, epochs=2),
    'sgdm': dict(lr=0.05, momentum=0.9),
    'bias_only': dict(lr=0.2, bias_only=True),
  }
  evaluate = fl.algorithms.build_personalization_eval(
    model, strategies, max_num_clients=MAX_CLIENTS, client_chunk_size=chunk
  )
  train, test = _batches()
  out = evaluate(model.initial_weights, train, test)

  w0 = np.asarray(model.initial_weights.trainable['w'], np.float64)
  b0 = np.asarray(model.initial_weights.trainable['b'], np.float64)
  clients = range(len(TRAIN_SIZES))
  expected = {'baseline_metrics': [_evaluate(w0, b0, test, c) for c in clients]}
  for name, kwargs in reference.items():
    tuned = [_fine_tune(w0, b0, train, c, **kwargs) for c in clients]
    expected[name] = [_evaluate(*wb, test, c) for c, wb in zip(clients, tuned, strict=True)]

  assert set(out.metrics) == set(out.client_metrics) == set(expected)
  for name, per_client in expected.items():
    _assert_metrics(out.metrics[name], _metrics(per_client))
    for c in range(MAX_CLIENTS):
      got = jax.tree.map(lambda x, c=c: x[c], out.client_metrics[name])
      if per_client[c][2] == 0:  # a client without test examples reports zeros
        assert int(got['num_examples']) == 0 and float(got['loss']) == 0.0
      else:
        _assert_metrics(got, _metrics([per_client[c]]))
  # Fine-tuning happened: every strategy moved client 0's test loss away from the baseline.
  baseline_loss = float(out.client_metrics['baseline_metrics']['loss'][0])
  for name in reference:
    assert abs(float(out.client_metrics[name]['loss'][0]) - baseline_loss) > 1e-3


def test_padding_counts_in_no_metric():
  """Padded steps, and the empty clients that pad 5 clients to 2 devices, change nothing."""
  model = ref.linear_model(5, 3)
  strategies = {'sgd': fl.algorithms.Personalization(fl.optimizers.build_sgdm(0.1), 3)}
  evaluate = fl.algorithms.build_personalization_eval(model, strategies)
  short = evaluate(model.initial_weights, *_batches())
  padded = evaluate(model.initial_weights, *_batches(num_steps=6))
  mesh = jax.sharding.Mesh(jax.devices()[:2], ('clients',))
  sharded = fl.algorithms.build_personalization_eval(model, strategies, mesh=mesh)
  for other in (padded, sharded(model.initial_weights, *_batches())):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), short, other)
  evaluate(model.initial_weights, *_batches())
  assert evaluate._cache_size() == 2  # one program per shape, reused


def test_custom_evaluate_fn_measures_baseline_and_personalized_models_without_client_metrics():
  model = ref.linear_model(5, 3)

  def doubled_inputs(weights, batch, mask):
    batch = {**batch, 'x': 2.0 * batch['x']}
    return fl.templates.masked_forward(model, weights, batch, mask, False)[1]

  evaluate = fl.algorithms.build_personalization_eval(
    model, {'sgd': fl.optimizers.build_sgdm(0.1)}, doubled_inputs, max_num_clients=0
  )
  train, test = _batches()
  out = evaluate(model.initial_weights, train, test)
  w0 = np.asarray(model.initial_weights.trainable['w'], np.float64)
  b0 = np.asarray(model.initial_weights.trainable['b'], np.float64)
  clients = range(len(TRAIN_SIZES))
  baseline = [_evaluate(w0, b0, test, c, scale=2.0) for c in clients]
  tuned = [_fine_tune(w0, b0, train, c, lr=0.1) for c in clients]
  personalized = [_evaluate(*tuned[c], test, c, scale=2.0) for c in clients]
  _assert_metrics(out.metrics['baseline_metrics'], _metrics(baseline))
  _assert_metrics(out.metrics['sgd'], _metrics(personalized))
  assert all(leaf.shape == (0,) for leaf in jax.tree.leaves(out.client_metrics))


@pytest.mark.parametrize(
  ('kwargs', 'error', 'match'),
  [
    (dict(personalize_fns={}), TypeError, 'personalize_fns must be a non-empty mapping'),
    (dict(personalize_fns={'baseline_metrics': fl.optimizers.build_sgdm()}), ValueError, 'key'),
    (dict(personalize_fns={1: fl.optimizers.build_sgdm()}), TypeError, 'keys must be strings'),
    (dict(personalize_fns={'a': 0.1}), TypeError, r"personalize_fns\['a'\] must be"),
    (
      dict(personalize_fns={'a': fl.algorithms.Personalization(fl.optimizers.build_sgdm(), 0)}),
      ValueError,
      r"personalize_fns\['a'\].num_epochs",
    ),
    (
      dict(personalize_fns={'a': fl.algorithms.Personalization('sgd')}),
      TypeError,
      r"personalize_fns\['a'\].fine_tune",
    ),
    (dict(baseline_evaluate_fn=3), TypeError, 'baseline_evaluate_fn must be callable'),
    (dict(max_num_clients=-1), ValueError, 'max_num_clients must be an int >= 0'),
    (dict(max_num_clients=2.0), TypeError, 'max_num_clients must be an int >= 0'),
  ],
)
def test_bad_arguments_are_named(kwargs, error, match):
  args = {'personalize_fns': {'sgd': fl.optimizers.build_sgdm(0.1)}, **kwargs}
  with pytest.raises(error, match=match):
    fl.algorithms.build_personalization_eval(ref.linear_model(5, 3), **args)


def test_bad_batches_are_named():
  model = ref.linear_model(5, 3)
  evaluate = fl.algorithms.build_personalization_eval(model, {'sgd': fl.optimizers.build_sgdm()})
  train, test = _batches()
  fewer = fl.data.build_client_batches(ref.random_clients(TEST_SIZES[:3]), batch_size=3)
  with pytest.raises(ValueError, match='train_batches has 5 clients and test_batches 3'):
    evaluate(model.initial_weights, train, fewer)
  with pytest.raises(TypeError, match=r'test_batches must be a fedjax_lite\.ClientBatches'):
    evaluate(model.initial_weights, train, test.batch)


def _with_ids(batches, ids):
  return batches._replace(client_ids=np.asarray(ids, np.uint32))


def test_clients_in_another_order_are_refused_naming_the_first_position():
  """Only the counts used to be compared: the same clients in another order evaluated each
  client's fine-tuned model on another client's test part, silently."""
  model = ref.linear_model(5, 3)
  evaluate = fl.algorithms.build_personalization_eval(model, {'sgd': fl.optimizers.build_sgdm()})
  train, test = _batches()
  ids = [11, 12, 13, 14, 15]
  evaluate(model.initial_weights, _with_ids(train, ids), _with_ids(test, ids))  # same order
  swapped = [11, 12, 13, 15, 14]
  message = (
    r'hold different clients at position 3: train_batches.client_ids\[3\] is 14 and '
    r'test_batches.client_ids\[3\] is 15 \(2 of 5 positions differ\)'
  )
  with pytest.raises(ValueError, match=message):
    evaluate(model.initial_weights, _with_ids(train, ids), _with_ids(test, swapped))
  # Ids on one side only: nothing to compare them with.
  evaluate(model.initial_weights, _with_ids(train, ids), test._replace(client_ids=None))


def test_padding_clients_ids_are_not_compared():
  """A position with no example on either side is padding (e.g. zeros that fill a
  multi-process cohort); one with data on either side is a client and must match."""
  model = ref.linear_model(5, 3)
  evaluate = fl.algorithms.build_personalization_eval(model, {'sgd': fl.optimizers.build_sgdm()})
  train = fl.data.build_client_batches(ref.random_clients([7, 0, 0], seed=1), batch_size=4)
  test = fl.data.build_client_batches(ref.random_clients([5, 3, 0], seed=2), batch_size=3)
  evaluate(model.initial_weights, _with_ids(train, [1, 2, 0]), _with_ids(test, [1, 2, 9]))
  with pytest.raises(ValueError, match=r'at position 1: train_batches.client_ids\[1\] is 0'):
    evaluate(model.initial_weights, _with_ids(train, [1, 0, 0]), _with_ids(test, [1, 2, 0]))


def test_a_custom_loop_must_return_its_fine_tuned_weights():
  model = ref.linear_model(5, 3)

  def forgetful(model_weights, hparams):
    return fl.templates.ClientLoop(
      lambda client_input, key: (),
      lambda carry, batch, mask, key: (carry, None),
      lambda carry: fl.templates.ClientOutput(),
    )

  evaluate = fl.algorithms.build_personalization_eval(
    model, {'forgetful': fl.algorithms.Personalization(forgetful)}
  )
  with pytest.raises(TypeError, match=r"personalize_fns\['forgetful'\].*model_weights=None"):
    evaluate(model.initial_weights, *_batches())
