"""`build_broadcast_process`: the server's model weights, unchanged, for every client."""

from __future__ import annotations

from typing import Any

from fedjax_lite.templates import _processes


def build_broadcast_process(model_weights_spec: Any = None) -> _processes.DistributionProcess:
  """A stateless `DistributionProcess` that sends the same value to every client.

  In one program every client reads the same server array, so broadcast is the identity; when
  the client axis is sharded, XLA replicates the weights to each device.

  Args:
    model_weights_spec: optional pytree of the weights (arrays or `jax.ShapeDtypeStruct`), used
      to validate the process at construction.
  """

  def initialize():
    return ()

  def next_fn(state, value):
    return _processes.MeasuredProcessOutput(state, value, {})

  return _processes.DistributionProcess(initialize, next_fn, value_spec=model_weights_spec)
