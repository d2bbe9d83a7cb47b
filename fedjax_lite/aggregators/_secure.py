"""Secure summation, simulated: TFF's `SecureSumFactory` for floating-point values, with the
arithmetic a secure-aggregation protocol imposes made visible. Each client clips its value to
`[lower, upper]` and encodes it as a fixed-point integer of `bits` bits; the integers are summed
modulo 2^32, as a protocol over 32-bit words sums them; the server subtracts the clients' code
of 0 (still modulo 2^32), reads the result as a signed 32-bit integer and scales it back. Users
see the quantization error of `bits`, the clipping, and the wrap-around when the signed sum of
codes leaves ±2^31 (many clients, or `bits` too high), counted in `secure_overflow`."""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from fedjax_lite.aggregators import _factories, _quantile
from fedjax_lite.templates import _processes

_SIGNED_RANGE = 2.0**31  # the decoded sum is read as a signed 32-bit integer


class SecureSumFactory:
  """An unweighted, simulated secure sum of floating-point values.

  `upper_bound_threshold` is a number (with `lower_bound_threshold`, or `-upper` when that is
  None) or an `EstimationProcess` fed every client's largest absolute value, giving the bound
  `[-estimate, estimate]` (TFF's single-process form). Measurements, as TFF's:
  `secure_upper_threshold`, `secure_lower_threshold`, `secure_upper_clipped_count`,
  `secure_lower_clipped_count`; and `secure_overflow`, the coordinates whose sum wrapped (from a
  float32 shadow of the signed codes, exact away from the boundary).

  Args:
    upper_bound_threshold: a number > lower bound, or an `EstimationProcess`.
    lower_bound_threshold: a number, or None for `-upper_bound_threshold`.
    bits: bits of each client's fixed-point value, 1..32. Values that span the whole range
      wrap once `clients * 2^(bits-1)` reaches 2^31: the default 20 allows 4,096 clients.
  """

  def __init__(
    self,
    upper_bound_threshold: float | _processes.EstimationProcess,
    lower_bound_threshold: float | None = None,
    *,
    bits: int = 20,
  ):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 32:
      raise ValueError(f'bits must be an int in 1..32; got {bits!r}')
    if isinstance(upper_bound_threshold, _processes.EstimationProcess):
      if lower_bound_threshold is not None:
        raise ValueError('an adaptive upper_bound_threshold sets the lower bound to its negative')
      self._bound = upper_bound_threshold
      self._lower = None
    else:
      for name, value in [('upper', upper_bound_threshold), ('lower', lower_bound_threshold)]:
        if value is not None and (
          isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value)
        ):
          raise ValueError(f'{name}_bound_threshold must be a finite number; got {value!r}')
      lower = -upper_bound_threshold if lower_bound_threshold is None else lower_bound_threshold
      if not upper_bound_threshold > lower:
        raise ValueError(
          f'upper_bound_threshold ({upper_bound_threshold}) must exceed the lower bound ({lower})'
        )
      self._bound = _quantile.constant_estimate(float(upper_bound_threshold))
      self._lower = float(lower)
    self._bits = bits

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    spec = _factories.float_spec(value_spec)
    bound, fixed_lower, levels = self._bound, self._lower, float(2**self._bits - 1)

    def codec(state):
      """(upper, lower, step, the code of 0): x is sent as round((clip(x) - lower) / step)."""
      upper = bound.report(state)
      lower = -upper if fixed_lower is None else jnp.float32(fixed_lower)
      step = jnp.maximum(upper - lower, 1e-30) / levels
      zero = jnp.clip(jnp.round(-lower / step), 0, levels)
      return upper, lower, step, zero

    def client_part(state, value, client_id):
      del client_id
      upper, lower, step, zero = codec(state)
      leaves = jax.tree.leaves(value)
      high = functools.reduce(jnp.maximum, [jnp.max(x) for x in leaves])
      low = functools.reduce(jnp.minimum, [jnp.min(x) for x in leaves])

      def encode(x):
        clipped = jnp.clip(x.astype(jnp.float32), lower, upper)
        return jnp.round((clipped - lower) / step).astype(jnp.uint32)

      encoded = jax.tree.map(encode, value)
      counts = {
        'upper': (high > upper).astype(jnp.int32),
        'lower': (low < lower).astype(jnp.int32),
        'clients': jnp.uint32(1),
      }
      # A float32 shadow of the signed codes, only to detect a sum that wraps.
      shadow = jax.tree.map(lambda q: q.astype(jnp.float32) - zero, encoded)
      magnitude = jnp.maximum(jnp.abs(high), jnp.abs(low))
      return encoded, shadow, counts, bound.client_part(state, magnitude)

    def server_part(state, total):
      encoded_sum, shadow_sum, counts, bound_sum = total
      upper, lower, step, zero = codec(state)
      clients = counts['clients']
      zero_code = zero.astype(jnp.uint32)
      # Σq − n·code(0), in the protocol's modular arithmetic, read as a signed integer: the sum of
      # the clients' offsets from 0, small when the values are, so the decoding loses nothing.
      offset = clients.astype(jnp.float32) * (lower + zero * step)

      def decode(q, s):
        centered = lax.bitcast_convert_type(q - clients * zero_code, jnp.int32)
        return (centered.astype(jnp.float32) * step + offset).astype(s.dtype)

      result = jax.tree.map(decode, encoded_sum, spec)
      overflow = sum(
        jnp.sum(jnp.abs(s) >= _SIGNED_RANGE).astype(jnp.int32) for s in jax.tree.leaves(shadow_sum)
      )
      measurements = {
        'secure_upper_clipped_count': counts['upper'],
        'secure_lower_clipped_count': counts['lower'],
        'secure_upper_threshold': upper,
        'secure_lower_threshold': lower,
        'secure_overflow': jnp.int32(overflow),
      }
      new_state = bound.server_part(state, bound_sum)
      return _processes.MeasuredProcessOutput(new_state, result, measurements)

    return _processes.AggregationProcess(
      bound.initialize,
      None,
      False,
      client_part=client_part,
      server_part=server_part,
      value_spec=spec,
    )
