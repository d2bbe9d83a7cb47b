"""Privacy accounting against dp-accounting itself and a published configuration; TFF's presets
as compositions of the factories."""

import math

import dp_accounting
import jax
import numpy as np
import numpy_reference as ref
import pytest
from dp_accounting import pld, rdp

import fedjax_lite as fl

AGG = fl.aggregators


def test_rdp_epsilon_equals_the_library_and_the_dp_sgd_mnist_tutorial():
  """TF Privacy's MNIST tutorial: 60,000 examples, batches of 256, noise 1.1, 60 epochs,
  δ = 1e-5 (14,062 steps): ε of about 3 (2.92 with TF Privacy's older RDP orders)."""
  accountant = AGG.PrivacyAccountant(1.1, 256, 60_000, 1e-5)
  direct = rdp.RdpAccountant()
  direct.compose(
    dp_accounting.PoissonSampledDpEvent(256 / 60_000, dp_accounting.GaussianDpEvent(1.1)), 14_062
  )
  assert accountant.epsilon(14_062) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
  assert 2.4 < accountant.epsilon(14_062) < 3.1
  assert 'Poisson sampling' in accountant.assumption


def test_pld_and_fixed_size_sampling():
  poisson_pld = AGG.PrivacyAccountant(1.0, 100, 10_000, 1e-6, accountant='pld')
  direct = pld.PLDAccountant()
  direct.compose(dp_accounting.PoissonSampledDpEvent(0.01, dp_accounting.GaussianDpEvent(1.0)), 500)
  assert poisson_pld.epsilon(500) == pytest.approx(direct.get_epsilon(1e-6), rel=1e-9)
  poisson_rdp = AGG.PrivacyAccountant(1.0, 100, 10_000, 1e-6)
  assert poisson_pld.epsilon(500) <= poisson_rdp.epsilon(500)  # PLD is the tighter bound
  fixed = AGG.PrivacyAccountant(1.0, 100, 10_000, 1e-6, sampling='fixed_size')
  assert fixed.epsilon(500) > poisson_rdp.epsilon(500)  # replace-one neighbours cost more
  assert 'without replacement' in fixed.assumption
  eps = [poisson_rdp.epsilon(r) for r in (0, 1, 10, 100)]
  assert eps[0] == 0.0 and eps == sorted(eps)


def _replace_one_pair_epsilon(z, clients_per_round, population, rounds, delta):
  """A lower bound on the ε of fixed-size DP-FedAvg under replace-one neighbours, from one pair.

  Every other client sends −clip·e₁; the replaced client sends +clip·e₁ in one population and
  −clip·e₁ in the other. It is sampled with probability q = m / n, and then the clipped sums
  differ by 2·clip; otherwise the outputs are identical. So one round is the pair
  N(0, z²) vs (1 − q)·N(0, z²) + q·N(2, z²) (in units of the clip), exactly, and dp-accounting's
  optimistic PLD of its r-fold composition bounds the mechanism's ε from below.
  """
  pair = pld.privacy_loss_distribution.from_gaussian_mechanism(
    standard_deviation=z,
    sensitivity=2.0,
    sampling_prob=clients_per_round / population,
    pessimistic_estimate=False,
    use_connect_dots=False,
    value_discretization_interval=1e-3,
  )
  return pair.self_compose(rounds).get_epsilon_for_delta(delta)


@pytest.mark.parametrize(
  'z, clients_per_round, population, rounds',
  [(0.8, 10, 30, 20), (1.0, 100, 1000, 100)],  # the command's defaults; a larger population
)
def test_fixed_size_epsilon_is_at_least_one_neighbouring_pairs(
  z, clients_per_round, population, rounds
):
  """Before the sensitivity of replace-one was counted, ε was 18.8 and 12.9 here (the pair
  needs 36.3 and 27.1)."""
  delta = 0.1 / population  # the command's default δ
  accountant = AGG.PrivacyAccountant(z, clients_per_round, population, delta, sampling='fixed_size')
  lower = _replace_one_pair_epsilon(z, clients_per_round, population, rounds, delta)
  assert lower > 20  # the pair alone is far from private at these settings
  assert accountant.epsilon(rounds) >= lower
  # and it is dp-accounting's replace-one analysis at multiplier z / 2 (sensitivity 2 · clip)
  direct = rdp.RdpAccountant(neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
  direct.compose(
    dp_accounting.SampledWithoutReplacementDpEvent(
      population, clients_per_round, dp_accounting.GaussianDpEvent(z / 2)
    ),
    rounds,
  )
  assert accountant.epsilon(rounds) == pytest.approx(direct.get_epsilon(delta), rel=1e-12)


@pytest.mark.parametrize(
  'kwargs',
  [
    {'noise_multiplier': 0.0},
    {'clients_per_round': 0},
    {'clients_per_round': 200},
    {'target_delta': 1.0},
    {'sampling': 'shuffle'},
    {'sampling': 'fixed_size', 'accountant': 'pld'},
  ],
)
def test_bad_accounting_arguments(kwargs):
  args = {'noise_multiplier': 1.0, 'clients_per_round': 10, 'population': 100, 'target_delta': 1e-5}
  with pytest.raises(ValueError):
    AGG.PrivacyAccountant(**{**args, **kwargs})


def _run(aggregator, builder=fl.algorithms.build_weighted_fed_avg):
  model = ref.linear_model(5, 3)
  batches = fl.data.build_client_batches(ref.random_clients([9, 2, 14, 5, 7]), batch_size=4)
  process = builder(model, fl.optimizers.build_sgdm(0.1), model_aggregator=aggregator)
  state = process.initialize()
  for _ in range(3):
    state, metrics = process.next(state, batches)
  return process.get_model_weights(state).trainable, metrics['aggregator']


def test_robust_aggregator_is_tffs_composition():
  got, measurements = _run(AGG.robust_aggregator())
  clip = AGG.PrivateQuantileEstimationProcess.no_noise(1.0, 0.8, 0.2)
  zero = AGG.PrivateQuantileEstimationProcess.no_noise(10.0, 0.98, math.log(10.0), 2.0, 1.0)
  manual = AGG.zeroing_factory(zero, AGG.clipping_factory(clip, AGG.MeanFactory()))
  want, _ = _run(manual)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k])
  assert set(measurements) == {'zeroing', 'zeroing_norm', 'zeroed_count'}
  assert set(measurements['zeroing']) == {'clipping', 'clipping_norm', 'clipped_count'}
  unweighted = AGG.robust_aggregator(zeroing=False, clipping=False, weighted=False)
  assert isinstance(unweighted, AGG.UnweightedMeanFactory)


def test_dp_aggregator_is_unweighted_zeroed_adaptive_gaussian():
  factory = AGG.dp_aggregator(0.5, clients_per_round=50)
  spec = jax.ShapeDtypeStruct((3,), np.float32)
  process = factory.create(spec)
  assert not process.is_weighted and process.streams
  _, measurements = _run(factory, fl.algorithms.build_unweighted_fed_avg)
  assert set(measurements['zeroing']['dp_query_metrics']) == {'clip', 'clipped_count'}
  assert float(measurements['zeroing']['dp_query_metrics']['clip']) != pytest.approx(0.1)
