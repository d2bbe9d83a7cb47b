"""A composed process refuses weights and states of another model, naming the leaf; FedAvg's
and FedSGD's randomness follows their seed."""

import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl


def _process(num_features=5):
  return fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(num_features, 3), fl.optimizers.build_sgdm(0.1)
  )


def test_set_model_weights_of_another_shape_names_the_leaf():
  process = _process()
  other = ref.linear_model(7, 3).initial_weights
  with pytest.raises(
    ValueError, match=r"trainable\['w'\] is float32\[7, 3\]; expected float32\[5, 3\]"
  ):
    process.set_model_weights(process.initialize(), other)
  with pytest.raises(ValueError, match='tree structure differs'):
    process.set_model_weights(process.initialize(), {'w': np.zeros((5, 3), np.float32)})
  same = ref.linear_model(5, 3, seed=4).initial_weights  # same shapes: accepted
  state = process.set_model_weights(process.initialize(), same)
  np.testing.assert_array_equal(
    process.get_model_weights(state).trainable['w'], same.trainable['w']
  )


def test_next_with_a_state_of_another_model_is_refused():
  process, other = _process(), _process(num_features=7)
  batches = fl.data.build_client_batches(ref.random_clients([4, 6]), batch_size=4)
  with pytest.raises(ValueError, match=r"state does not match this process's state: .*\[7, 3\]"):
    process.next(other.initialize(), batches)


@pytest.mark.parametrize('builder', ['fed_avg', 'fed_sgd'])
def test_dropout_keys_follow_the_seed(builder):
  model = ref.dropout_linear_model(5, 3)
  build = {
    'fed_avg': lambda seed: fl.algorithms.build_weighted_fed_avg(
      model, fl.optimizers.build_sgdm(0.5), seed=seed
    ),
    'fed_sgd': lambda seed: fl.algorithms.build_fed_sgd(model, seed=seed),
  }[builder]
  batches = fl.data.build_client_batches(ref.random_clients([8, 5]), batch_size=4)
  weights = {}
  for seed in (0, 0, 1):
    process = build(seed)
    state, _ = process.next(process.initialize(), batches)
    weights.setdefault(seed, []).append(process.get_model_weights(state).trainable['w'])
  np.testing.assert_array_equal(weights[0][0], weights[0][1])
  assert not np.allclose(weights[0][0], weights[1][0])
