"""Compressed aggregation: each client's update quantized stochastically to a few bits per
coordinate, optionally after a random Hadamard rotation (Suresh et al., 2017, "Distributed Mean
Estimation with Limited Communication"). The quantization is unbiased, so the sum of decoded
updates is an unbiased estimate of the true sum; the rotation spreads a leaf's energy over its
coordinates, shrinking the range the levels must cover. TFF's `EncodedFactory` role."""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from fedjax_lite.aggregators import _factories
from fedjax_lite.templates import _processes

ROTATIONS = ('none', 'hadamard')


class QuantizationState(NamedTuple):
  """`rng`: `[2] uint32`, this round's key (rotation signs, then each client's rounding)."""

  rng: jax.Array


def fwht(x: jax.Array) -> jax.Array:
  """The orthonormal fast Walsh-Hadamard transform of `x` `[d]`, d a power of 2 (its own
  inverse)."""
  d = x.shape[0]
  h = 1
  while h < d:
    pairs = jnp.reshape(x, (d // (2 * h), 2, h))
    x = jnp.reshape(jnp.stack([pairs[:, 0] + pairs[:, 1], pairs[:, 0] - pairs[:, 1]], 1), (d,))
    h *= 2
  return x / jnp.sqrt(jnp.float32(d))


def stochastic_quantize(x: jax.Array, bits: int, key: jax.Array) -> jax.Array:
  """`x` `[d]` rounded at random to one of `2**bits` levels spanning `[min(x), max(x)]`, decoded
  back to floats: each value goes to one of its two neighbouring levels with the probabilities
  that make it unbiased."""
  low, high = jnp.min(x), jnp.max(x)
  levels = 2**bits - 1
  step = jnp.where(high > low, (high - low) / levels, 1.0)
  scaled = (x - low) / step
  floor = jnp.floor(scaled)
  up = jax.random.uniform(key, x.shape) < scaled - floor
  return low + (floor + up.astype(x.dtype)) * step


class QuantizationFactory:
  """An unweighted sum of stochastically quantized values (use it as a mean's inner sum:
  `MeanFactory(value_sum_factory=QuantizationFactory(8))`).

  Leaves with at least `threshold` elements are sent as `bits` bits per coordinate plus their
  range (two float32); smaller leaves are sent as they are (TFF's `quantize_above_threshold`).
  With `rotation='hadamard'` a quantized leaf is multiplied by random signs and Hadamard-rotated
  (padded to a power of 2) before quantization; the server rotates the sum back (the rotation is
  linear and shared by the round's clients). Measurements: `bits_per_client` (the bits one client
  sends) and `compression_ratio` (float32 bits over sent bits).

  Args:
    bits: 1..16 bits per coordinate.
    threshold: quantize leaves of at least this many elements.
    rotation: `none` or `hadamard`.
    seed: seeds the rounding and the rotations.
  """

  def __init__(self, bits: int = 8, threshold: int = 20000, rotation: str = 'none', seed: int = 0):
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
      raise ValueError(f'bits must be an int in 1..16; got {bits!r}')
    if isinstance(threshold, bool) or not isinstance(threshold, int) or threshold < 0:
      raise ValueError(f'threshold must be an int >= 0; got {threshold!r}')
    if rotation not in ROTATIONS:
      raise ValueError(f'rotation must be one of {ROTATIONS}; got {rotation!r}')
    self._bits, self._threshold, self._rotation, self._seed = bits, threshold, rotation, seed

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    spec = _factories.float_spec(value_spec)
    bits, rotate = self._bits, self._rotation == 'hadamard'
    leaves, treedef = jax.tree.flatten(spec)
    quantized = [leaf.size >= self._threshold and leaf.size > 0 for leaf in leaves]
    padded = [
      2 ** math.ceil(math.log2(leaf.size)) if rotate and q else leaf.size
      for leaf, q in zip(leaves, quantized, strict=True)
    ]
    sent_bits = sum(
      n * bits + 64 if q else 32 * leaf.size
      for leaf, q, n in zip(leaves, quantized, padded, strict=True)
    )
    ratio = 32 * sum(leaf.size for leaf in leaves) / max(sent_bits, 1)
    seed = self._seed

    def signs(state, index, size):
      key = jax.random.fold_in(jax.random.fold_in(state.rng, 0), index)
      return jnp.where(jax.random.bernoulli(key, 0.5, (size,)), 1.0, -1.0)

    def client_part(state, value, client_id):
      key = jax.random.fold_in(jax.random.fold_in(state.rng, 1), client_id)
      out = []
      for i, (x, q, n) in enumerate(zip(jax.tree.leaves(value), quantized, padded, strict=True)):
        if not q:
          out.append(x)
          continue
        flat = jnp.ravel(x).astype(jnp.float32)
        if rotate:
          flat = fwht(jnp.pad(flat, (0, n - flat.size)) * signs(state, i, n))
        out.append(stochastic_quantize(flat, bits, jax.random.fold_in(key, i)))
      return out

    def server_part(state, total):
      result = []
      for i, (s, leaf, q, n) in enumerate(zip(total, leaves, quantized, padded, strict=True)):
        if q:
          if rotate:
            s = (fwht(s) * signs(state, i, n))[: leaf.size]
          s = jnp.reshape(s, leaf.shape).astype(leaf.dtype)
        result.append(s)
      measurements = {
        'bits_per_client': jnp.float32(sent_bits),
        'compression_ratio': jnp.float32(ratio),
      }
      new_state = QuantizationState(jax.random.split(state.rng)[1])
      return _processes.MeasuredProcessOutput(
        new_state, jax.tree.unflatten(treedef, result), measurements
      )

    return _processes.AggregationProcess(
      lambda: QuantizationState(jax.random.PRNGKey(seed)),
      None,
      False,
      client_part=client_part,
      server_part=server_part,
      value_spec=spec,
    )
