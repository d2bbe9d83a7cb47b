"""FedAdam, FedYogi and FedAdagrad: TFF's rule applied to the averaged delta, in numpy, with the
defaults of Reddi et al. (2021), which depart from TFF's optimizer defaults where pinned here."""

import inspect

import chex
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 20, 33, 1]

# The presets' server settings: Reddi et al. (2021), "Adaptive Federated Optimization":
# β₁ = 0.9, β₂ = 0.99 (FedAdam, FedYogi), adaptivity τ = 1e-3 as `eps` (FedAdam, FedYogi), a
# second moment starting at τ² = 1e-6 (FedYogi, FedAdagrad); FedAdagrad's `eps` is TFF's.
PAPER = {
  'adam': dict(b1=0.9, b2=0.99, eps=1e-3),
  'yogi': dict(b1=0.9, b2=0.99, eps=1e-3, initial_accumulator_value=1e-6),
  'adagrad': dict(initial_accumulator_value=1e-6, eps=1e-7),
}
# Where those depart from tff.learning.optimizers.build_adam/build_yogi/build_adagrad's
# defaults (tensorflow_federated/python/learning/optimizers/{adam,yogi,adagrad}.py): TFF's values.
DEPARTS_FROM_TFF = {
  'adam': dict(b2=0.999, eps=1e-7),
  'yogi': dict(b2=0.999),
  'adagrad': dict(initial_accumulator_value=0.1),
}
PRESETS = {
  'adam': fl.algorithms.build_fed_adam,
  'yogi': fl.algorithms.build_fed_yogi,
  'adagrad': fl.algorithms.build_fed_adagrad,
}
OPTIMIZERS = {
  'adam': fl.optimizers.build_adam,
  'yogi': fl.optimizers.build_yogi,
  'adagrad': fl.optimizers.build_adagrad,
}


@pytest.mark.parametrize('name', sorted(PAPER))
def test_defaults_are_the_papers_and_depart_from_tff_only_where_documented(name):
  preset = inspect.signature(PRESETS[name]).parameters
  assert {k: preset[k].default for k in PAPER[name]} == PAPER[name]
  assert preset['server_learning_rate'].default == 0.01
  tff = inspect.signature(OPTIMIZERS[name]).parameters  # TFF's defaults (tests/optimizers)
  departures = {k: tff[k].default for k in PAPER[name] if tff[k].default != PAPER[name][k]}
  assert departures == DEPARTS_FROM_TFF[name]


@pytest.mark.parametrize('name', sorted(PAPER))
def test_preset_equals_fed_avg_with_the_server_optimizer(name):
  """The preset is `build_weighted_fed_avg` with `fl.optimizers.build_<name>` given the preset's
  settings: same state, same rounds."""
  model = ref.linear_model(5, 3)
  client = fl.optimizers.build_sgdm(0.1)
  preset = PRESETS[name](model, client, 0.05)
  direct = fl.algorithms.build_weighted_fed_avg(
    model, client, OPTIMIZERS[name](0.05, **PAPER[name])
  )
  a, b = preset.initialize(), direct.initialize()
  chex.assert_trees_all_equal(a, b)
  for round_num in range(2):
    batches = fl.data.build_client_batches(ref.random_clients(SIZES), batch_size=4, seed=round_num)
    (a, ma), (b, mb) = preset.next(a, batches), direct.next(b, batches)
    chex.assert_trees_all_close(a, b, rtol=1e-6, atol=1e-7)
    chex.assert_trees_all_close(ma, mb, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize(
  ('builder', 'name', 'server'),
  [
    (fl.algorithms.build_fed_adam, 'adam', PAPER['adam']),
    (fl.algorithms.build_fed_yogi, 'yogi', PAPER['yogi']),
    (fl.algorithms.build_fed_adagrad, 'adagrad', PAPER['adagrad']),
  ],
)
def test_server_optimizer_applies_tff_rule_to_the_averaged_delta(builder, name, server):
  server_lr, client_lr = 0.05, 0.1
  process = builder(ref.linear_model(5, 3), fl.optimizers.build_sgdm(client_lr), server_lr)
  state = process.initialize()
  t = process.get_model_weights(state).trainable
  w, b = np.asarray(t['w'], np.float64), np.asarray(t['b'], np.float64)
  h = {'learning_rate': server_lr, **server}
  opt_w = opt_b = None
  clients = ref.random_clients(SIZES)
  for round_num in range(3):
    batches = fl.data.build_client_batches(clients, batch_size=4, seed=round_num)
    state, metrics = process.next(state, batches)
    avg_w, avg_b, expected = ref.fed_avg_round(w, b, batches, client_lr)
    update_w, opt_w = ref.tff_optimizer_update(name, h, w - avg_w, opt_w)
    update_b, opt_b = ref.tff_optimizer_update(name, h, b - avg_b, opt_b)
    w, b = w + update_w, b + update_b
    t = process.get_model_weights(state).trainable
    np.testing.assert_allclose(t['w'], w, atol=1e-5)
    np.testing.assert_allclose(t['b'], b, atol=1e-5)
    np.testing.assert_allclose(
      float(metrics['client_work']['train']['loss']), expected['loss'], rtol=1e-5
    )
  assert float(process.get_hparams(state)['finalizer']['learning_rate']) == pytest.approx(server_lr)
