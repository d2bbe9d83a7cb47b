"""set_hparams validates as the builders do, and finds hyperparameters inside optax chains."""

import jax.numpy as jnp
import numpy as np
import numpy_reference as ref
import optax
import pytest

import fedjax_lite as fl


@pytest.mark.parametrize(
  ('hparams', 'message'),
  [
    ({'learning_rate': -0.1}, r"hparams\['learning_rate'\] must be a finite number >= 0"),
    ({'learning_rate': float('nan')}, r"hparams\['learning_rate'\] must be a finite number"),
    ({'learning_rate': float('inf')}, r"hparams\['learning_rate'\] must be a finite number"),
    ({'momentum': 1.0}, r"hparams\['momentum'\] is a decay rate and must be in \[0, 1\)"),
  ],
)
def test_set_hparams_rejects_what_the_builders_reject(hparams, message):
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1, momentum=0.5)
  )
  with pytest.raises(ValueError, match=message):
    process.set_hparams(process.initialize(), {'client_work': hparams})
  with pytest.raises(ValueError):  # the builder says no to the same value
    fl.optimizers.build_sgdm(**{'learning_rate': 0.1, 'momentum': 0.5, **hparams})


def test_hyperparameters_inside_an_optax_chain_are_found_and_set():
  chained = optax.chain(optax.clip_by_global_norm(1.0), fl.optimizers.build_sgdm(0.1))
  model = ref.linear_model(5, 3)
  process = fl.algorithms.build_weighted_fed_avg(model, chained)
  state = process.initialize()
  assert float(process.get_hparams(state)['client_work']['learning_rate']) == pytest.approx(0.1)
  state = process.set_hparams(state, {'client_work': {'learning_rate': 0.0}})
  batches = fl.data.build_client_batches(ref.random_clients([6, 3]), batch_size=4)
  state, _ = process.next(state, batches)
  np.testing.assert_array_equal(  # learning rate 0: the model does not move
    process.get_model_weights(state).trainable['w'], model.initial_weights.trainable['w']
  )


def test_two_injected_transformations_with_one_name_are_refused():
  twice = optax.chain(fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(0.2))
  with pytest.raises(ValueError, match=r"hyperparameters \['learning_rate'\] twice"):
    fl.optimizers.get_hparams(twice.init({'w': jnp.zeros(2)}))


def test_set_hparams_on_a_scheduled_learning_rate_raises_instead_of_being_ignored():
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3),
    fl.optimizers.build_sgdm(schedule, momentum=0.5),
    fl.optimizers.build_sgdm(schedule),
  )
  state = process.initialize()
  with pytest.raises(ValueError, match=r"unknown keys \['learning_rate'\].*follows a schedule"):
    process.set_hparams(state, {'client_work': {'learning_rate': 0.2}})
  with pytest.raises(ValueError, match=r"hparams \['learning_rate'\] follow a schedule"):
    process.set_hparams(state, {'finalizer': {'learning_rate': 0.2}})
  state = process.set_hparams(state, {'client_work': {'momentum': 0.25}})
  assert float(process.get_hparams(state)['client_work']['momentum']) == 0.25
