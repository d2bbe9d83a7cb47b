"""A LearningProcess is a TFF IterativeProcess: `isinstance`, `state_type`, and the driver."""

import jax
import numpy_reference as ref

import fedjax_lite as fl
from fedjax_lite import tree as tree_lib


def test_learning_process_is_an_iterative_process_with_state_type():
  process = fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1)
  )
  assert isinstance(process, fl.templates.IterativeProcess)
  state = process.initialize()
  assert all(isinstance(s, jax.ShapeDtypeStruct) for s in jax.tree.leaves(process.state_type))
  assert tree_lib.tree_spec_mismatch(process.state_type, state) is None
  cb = fl.data.build_client_batches(ref.random_clients([3, 6]), batch_size=2, seed=0)
  # IterativeProcess's own checks accept its next (the state comes first in its output) ...
  iterative = fl.templates.IterativeProcess(
    process.initialize, process.next, next_arg_specs=(tree_lib.tree_specs(cb),)
  )
  assert tree_lib.tree_spec_mismatch(iterative.state_type, process.state_type) is None
  # ... and the driver runs it as any process.
  final = fl.simulation.run_training_process(process, lambda round_num: cb, 2)
  expected = process.next(process.next(state, cb).state, cb).state
  for a, b in zip(jax.tree.leaves(final), jax.tree.leaves(expected), strict=True):
    assert (a == b).all()
