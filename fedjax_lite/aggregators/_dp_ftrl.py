"""DP-FTRL's aggregation: clipped client updates summed, plus noise correlated across rounds.

DP-FTRL (Kairouz et al., 2021, "Practical and Private (Deep) Learning without Sampling or
Shuffling") adds to round t's clipped sum `x_t` the noise `(C⁺Z)_t`: `Z` is i.i.d. Gaussian with
standard deviation `noise_multiplier · clip` per coordinate and `C⁺` a left inverse of the
mechanism's strategy matrix `C`, so every released prefix `Σ_{s≤t} (x_s + (C⁺Z)_s)` is a
post-processing of `Cx + Z`: a Gaussian mechanism whose sensitivity is `C`'s under the
participation schedule (`DPFTRLAccountant`). No amplification by sampling is assumed. The noisy
sum is divided by `clients_per_round` (an unweighted mean, as DP-FedAvg's) and drives the server
optimizer: DP-FTRL with momentum is FedAvg's server SGD with momentum on this mean.

Mechanisms (`build_dp_ftrl_mechanism`):
  `tree`: TFF's `DifferentiallyPrivateFactory.tree_aggregation` (TF Privacy's
    `TreeResidualSumQuery` with `use_efficient=True`): a binary tree over rounds, one Gaussian
    per node, Honaker's efficient estimate of each prefix sum; the round's noise is the
    difference of successive prefix-sum noises (the "residual").
  `banded`: banded matrix factorization (Choquette-Choo et al., 2023), a column-normalized
    banded Toeplitz `C` optimized by jax-privacy for the run's rounds.
  `blt`: buffered linear Toeplitz (Dvijotham et al., 2024; McMahan et al., 2024), optimized by
    jax-privacy's `buffered_toeplitz.optimize` for the run's rounds and schedule.
The noise is generated in streaming form; the mechanism's state (tree nodes, band history, BLT
buffers) lives in the aggregator state, so it is checkpointed with the learning process and a
resumed run continues bitwise.

The horizon: a mechanism is built, and analysed, for exactly `total_rounds` rounds
(`factory.total_rounds`, `factory.mechanism.total_rounds`). Past it the noise is no longer what
the accountant analysed (the tree's nodes even cancel: its noise is exactly 0 at round index
`2^levels - 1`, the cumulative sum released in the clear), so from round index `total_rounds` on
every aggregate is NaN: a run past the horizon diverges instead of leaking. Build the mechanism
for the whole run.

What the guarantee rests on:
  * The strategy is not stored: a resumed run re-optimizes it from the same arguments
    (jax-privacy's optimizers are deterministic, so the same machine and versions give the same
    floats; the cached arrays are read-only, so the noise and the accountant share one `C`).
  * The noise key derives from the run's `seed` and the checkpoint holds the noise state (past
    node values, noise inputs or buffers): whoever reads either can subtract the noise, so the
    seed and the checkpoints must stay as private as the clients' data.
  * Memory: the state holds `mechanism.buffers` model-sized float32 arrays per value leaf: the
    tree `levels + 1`, BLT its buffers (<= `bands`, default 10), banded `bands - 1` with
    `bands = min_separation` by default, so it grows with b (pass a smaller `bands` to cap it).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax_privacy.matrix_factorization import banded as jp_banded
from jax_privacy.matrix_factorization import buffered_toeplitz as jp_blt
from jax_privacy.matrix_factorization import sensitivity as jp_sensitivity
from jax_privacy.matrix_factorization import toeplitz as jp_toeplitz

from fedjax_lite.aggregators import _factories, _quantile, _robust
from fedjax_lite.templates import _processes

MECHANISMS = ('tree', 'banded', 'blt')


def _check_int(name: str, value: Any, low: int) -> int:
  if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
    raise ValueError(f'{name} must be an int >= {low}; got {value!r}')
  return int(value)


def max_participations_for(
  total_rounds: int, min_separation: int, max_participations: int | None = None
) -> int:
  """The most rounds one client can join: `ceil(total_rounds / min_separation)`, capped by
  `max_participations` when given (jax-privacy's `minsep_true_max_participations`)."""
  return int(
    jp_sensitivity.minsep_true_max_participations(total_rounds, min_separation, max_participations)
  )


def _check_max_participations(
  total_rounds: int, min_separation: int, max_participations: int | None
) -> None:
  """Refuses a participation cap below what `sample_cohort(min_separation=b)` draws: no sampler
  enforces one, so an analysis with it would under-report ε."""
  most = -(-total_rounds // min_separation)
  if max_participations is not None and max_participations < most:
    raise ValueError(
      f'max_participations={max_participations} is below ceil(total_rounds / min_separation) = '
      f'ceil({total_rounds} / {min_separation}) = {most}: the schedule '
      f'fl.data.sample_cohort(min_separation={min_separation}) draws lets a client take part '
      f'ceil(n/b) = {most} times, and nothing enforces fewer. Tip: leave max_participations '
      'unset (it defaults to ceil(n/b)).'
    )


def _read_only(x: Any) -> np.ndarray:
  """A private, read-only float64 copy of a strategy array, flattened."""
  x = np.array(x, np.float64).reshape(-1)
  x.setflags(write=False)
  return x


def _tree_gram(rounds: int) -> np.ndarray:
  """`X = CᵀC` of the tree on its first `rounds` rounds, float64 `[rounds, rounds]`: `X[i, j]`
  counts the complete nodes (those `_tree_nodes(rounds)` lists) holding both leaves i and j."""
  leaf = np.arange(rounds)
  x = np.zeros((rounds, rounds))
  level = 0
  while 2**level <= rounds:
    node = leaf >> level
    complete = (node + 1) << level <= rounds
    x += (node[:, None] == node[None, :]) & complete[:, None]
    level += 1
  return x


def _max_participation_linear(x: np.ndarray, min_separation: int, k: int) -> np.ndarray:
  """jax-privacy's `max_participation_for_linear_fn` (VecSens, Choquette-Choo et al. 2023,
  Algorithm 3) over the last axis of `x` at once, in numpy float64: `max_u <x, u>` over the 0/1
  vectors `u` with at most `k` ones, any two at least `min_separation` apart."""
  # jax-privacy's f[i] (best over x[i:]) kept reversed, g[m] = f[n + b - 1 - m], so the update
  # f[:n] = x + f[b:] and the right-to-left running max run in place, left to right.
  n = x.shape[-1]
  reversed_x = np.ascontiguousarray(x[..., ::-1], np.float64)
  g = np.zeros((*x.shape[:-1], n + min_separation))
  for _ in range(k):
    g[..., min_separation:] = reversed_x + g[..., :n]
    np.maximum.accumulate(g, axis=-1, out=g)
  return g[..., -1]


def _min_sep_sensitivity_upper_bound(gram: np.ndarray, min_separation: int, k: int) -> float:
  """jax-privacy's `get_min_sep_sensitivity_upper_bound_for_X` (Choquette-Choo et al. 2023,
  Algorithm 4) in numpy float64, the same bound without a trace per shape: the best pattern's
  `Σ_j |X_ij|` per row i, then the best pattern over those row maxima. It is >= the
  min-separation sensitivity because it maximizes over a larger set (rows and columns may pick
  different patterns) and `‖Σ_j c_j g_jᵀ‖² = Σ_ij X_ij <g_i, g_j> <= Σ_ij |X_ij|` for
  contributions `‖g_j‖ <= 1`."""
  rows = _max_participation_linear(np.abs(gram), min_separation, k)
  return math.sqrt(float(_max_participation_linear(rows, min_separation, k)))


def _tree_nodes(rounds: int) -> list[tuple[int, int]]:
  """The `(level, index)` of every tree node whose leaves `[index·2^level, (index+1)·2^level)`
  lie within the first `rounds` rounds, leaves (level 0) first."""
  nodes = []
  level = 0
  while 2**level <= rounds:
    nodes += [(level, j) for j in range(rounds // 2**level)]
    level += 1
  return nodes


@dataclasses.dataclass(frozen=True, eq=False)
class CorrelatedNoiseMechanism:
  """A DP-FTRL noise mechanism for `total_rounds` rounds under a min-separation schedule.

  Build it with `build_dp_ftrl_mechanism`. The factory (`dp_ftrl_aggregator`) streams its noise;
  the accountant (`DPFTRLAccountant`) reads its sensitivity: hand both the same object.

  Attributes:
    name: `tree`, `banded` or `blt`.
    total_rounds: rounds the mechanism (and its analysis) covers: the aggregator's horizon.
      Aggregates from round index `total_rounds` on are NaN (see the module docstring).
    min_separation: b: a client joins at most once in any b consecutive rounds.
    max_participations: k: the most rounds a client joins, `ceil(total_rounds / b)` (the most
      `sample_cohort(min_separation=b)` allows; a lower cap is refused, nothing enforces it).
    strategy: jax-privacy's parameters of `C`: the banded Toeplitz coefficients `[bands]` (L2
      norm 1, column-normalized for `total_rounds`), the BLT's `(buf_decay, output_scale)`
      float64 arrays (all read-only: the noise and the accountant share them), or None (tree).
    bands: `banded`: the number of bands; `blt`: the most buffers its optimization could use
      (`buffers` is how many it has); None for the tree.
  """

  name: str
  total_rounds: int
  min_separation: int
  max_participations: int
  strategy: Any = None
  bands: int | None = None

  def __post_init__(self):
    _check_max_participations(self.total_rounds, self.min_separation, self.max_participations)

  @property
  def levels(self) -> int:
    """Tree levels kept in the state (leaves are level 0): `total_rounds.bit_length()`."""
    return max(1, self.total_rounds.bit_length())

  @property
  def buffers(self) -> int:
    """Model-sized float32 arrays the noise state holds (the mechanism's memory)."""
    if self.name == 'tree':
      return self.levels + 1  # one node per level and the previous prefix-sum noise
    if self.name == 'banded':
      return len(self.strategy) - 1  # the last bands - 1 noise inputs
    return len(self.strategy[0])  # BLT buffers

  def _blt(self, dtype=jnp.float64) -> jp_blt.BufferedToeplitz:
    buf_decay, output_scale = self.strategy
    return jp_blt.BufferedToeplitz(
      buf_decay=jnp.asarray(buf_decay, dtype), output_scale=jnp.asarray(output_scale, dtype)
    )

  def _rounds(self, rounds: int | None) -> int:
    rounds = self.total_rounds if rounds is None else _check_int('rounds', rounds, 1)
    if rounds > self.total_rounds:
      raise ValueError(
        f'rounds={rounds} exceeds the total_rounds={self.total_rounds} this {self.name} '
        'mechanism was built and analysed for. Tip: build the mechanism (and the aggregator) '
        'for the full run.'
      )
    return rounds

  def strategy_matrix(self, rounds: int | None = None) -> np.ndarray:
    """`C` restricted to the first `rounds` rounds (default all), float64: `[rounds, rounds]`
    (banded, BLT: lower-triangular) or `[nodes, rounds]` (tree: node-by-leaf indicators)."""
    rounds = self._rounds(rounds)
    if self.name == 'tree':
      nodes = _tree_nodes(rounds)
      c = np.zeros((len(nodes), rounds))
      for row, (level, j) in enumerate(nodes):
        c[row, j * 2**level : (j + 1) * 2**level] = 1.0
      return c
    if self.name == 'banded':
      with jax.enable_x64(True):
        coefs = jnp.asarray(self.strategy, jnp.float64)
        banded = jp_banded.ColumnNormalizedBanded.from_banded_toeplitz(self.total_rounds, coefs)
        c = np.asarray(banded.materialize())
      return c[:rounds, :rounds]
    with jax.enable_x64(True):
      return np.asarray(self._blt().materialize(rounds))

  def noising_matrix(self, rounds: int | None = None) -> np.ndarray:
    """The left inverse `C⁺` whose row t is round t's noise from `Z`, float64: `C⁻¹`
    `[rounds, rounds]`, or for the tree `A⁻¹B` `[rounds, nodes]` (B: the efficient estimate of
    each prefix sum from the nodes, A: the prefix-sum matrix), in the node order of
    `strategy_matrix`."""
    rounds = self._rounds(rounds)
    if self.name != 'tree':
      return np.linalg.inv(self.strategy_matrix(rounds))
    nodes = _tree_nodes(rounds)
    column = {node: i for i, node in enumerate(nodes)}
    prefix = np.zeros((rounds, len(nodes)))
    for t in range(rounds):
      # Round t's prefix [0, t] is the disjoint union of one complete subtree per set bit of
      # t + 1; each enters with Honaker's weight 1 / (2 - 2^-level) on the recursive value
      # R(v) = z_v + (R(left) + R(right)) / 2, i.e. a node u below v weighs 2^-(level(v) -
      # level(u)).
      start = 0
      for level in reversed(range((t + 1).bit_length())):
        if (t + 1) >> level & 1:
          weight = 1.0 / (2.0 - 0.5**level)
          for below in range(level + 1):
            first = start // 2**below
            for j in range(first, first + 2 ** (level - below)):
              prefix[t, column[(below, j)]] += weight * 0.5 ** (level - below)
          start += 2**level
    return np.diff(prefix, axis=0, prepend=0.0)

  def sensitivity(self, rounds: int | None = None) -> float:
    """L2 sensitivity of `C x` over the first `rounds` rounds when one client's clipped
    contributions (norm <= 1 each, at most `min(k, ceil(rounds / b))` rounds b apart) are zeroed
    out, from jax-privacy: `banded.minsep_sensitivity_squared` (bands <= b),
    `toeplitz.minsep_sensitivity_squared` (BLT; non-negative, non-increasing coefficients,
    checked), `_min_sep_sensitivity_upper_bound` (tree; jax-privacy's
    `get_min_sep_sensitivity_upper_bound` in numpy: an upper bound, milliseconds for a few
    hundred rounds)."""
    rounds = self._rounds(rounds)
    b = self.min_separation
    k = max_participations_for(rounds, b, self.max_participations)
    if self.name == 'banded':
      strategy = jp_banded.ColumnNormalizedBanded.from_banded_toeplitz(
        self.total_rounds, jnp.asarray(self.strategy)
      )
      return math.sqrt(float(jp_banded.minsep_sensitivity_squared(strategy, b, k, n=rounds)))
    if self.name == 'blt':
      with jax.enable_x64(True):
        coefs = self._blt().toeplitz_coefs(rounds)
        return math.sqrt(float(jp_toeplitz.minsep_sensitivity_squared(coefs, b, k, n=rounds)))
    return _min_sep_sensitivity_upper_bound(_tree_gram(rounds), b, k)

  # Streaming: per leaf of the value, `init(shape) -> state` and
  # `step(key, stddev, state, round_num) -> (noise, state)`.

  @functools.cached_property
  def _streaming_inverse(self) -> Any:
    """jax-privacy's `StreamingMatrix` of `C⁻¹` in float32 (banded, BLT), its constants built
    eagerly even when first asked for inside a trace (it is cached)."""
    with jax.ensure_compile_time_eval():
      if self.name == 'banded':
        return jp_toeplitz.inverse_as_streaming_matrix(
          np.asarray(self.strategy, np.float32), column_normalize_for_n=self.total_rounds
        )
      buf_decay, output_scale = (np.asarray(x, np.float32) for x in self.strategy)
      builder = jp_blt.StreamingMatrixBuilder(buf_decay=buf_decay, output_scale=output_scale)
      return builder.build_inverse()

  def init_state(self, shape: tuple[int, ...]) -> Any:
    """The noise state of one `[*shape]` value leaf before round 0 (float32 buffers)."""
    zeros = jnp.zeros(shape, jnp.float32)
    if self.name == 'tree':
      return (jnp.zeros((self.levels, *shape), jnp.float32), zeros)
    return self._streaming_inverse.init_multiply(zeros)

  def step(
    self, key: jax.Array, stddev: float, state: Any, round_num: jax.Array, shape: tuple[int, ...]
  ) -> tuple[jax.Array, Any]:
    """Round `round_num`'s noise `[*shape]` for one leaf and the next state. `Z`'s entries are
    drawn from `key`: `stddev · normal(key)` (banded, BLT), `stddev · normal(fold_in(key,
    level))` for the new leaf (level 0) and each node the round completes (tree)."""
    if self.name != 'tree':
      z = stddev * jax.random.normal(key, shape, jnp.float32)
      return self._streaming_inverse.multiply_next(z, state)
    nodes, previous = state
    levels = self.levels
    t = round_num.astype(jnp.int32)

    def draw(level):
      return stddev * jax.random.normal(jax.random.fold_in(key, level), shape, jnp.float32)

    # TF Privacy's EfficientTreeAggregator: the new leaf climbs while it is a right child,
    # merging with the stored left sibling: R(parent) = z_parent + (R(left) + R(right)) / 2.
    def climbing(carry):
      level, _ = carry
      return (level < levels - 1) & ((t >> level) & 1 == 1)

    def climb(carry):
      level, value = carry
      return level + 1, draw(level + 1) + 0.5 * (nodes[level] + value)

    level, value = jax.lax.while_loop(climbing, climb, (jnp.int32(0), draw(0)))
    nodes = nodes.at[level].set(value)
    present = ((t + 1) >> jnp.arange(levels)) & 1  # the subtrees that tile [0, t]
    weights = present / (2.0 - 0.5 ** jnp.arange(levels, dtype=jnp.float32))
    prefix = jnp.tensordot(weights.astype(jnp.float32), nodes, axes=1)
    return prefix - previous, (nodes, prefix)


@functools.lru_cache(maxsize=32)
def _optimized(
  name: str, total_rounds: int, min_separation: int, max_participations: int, bands: int
) -> Any:
  """jax-privacy's optimized strategy (cached: the factory and the accountant share it, so its
  arrays are read-only)."""
  if name == 'banded':
    if bands == 1:
      return _read_only(np.ones(1))
    return _read_only(jp_toeplitz.optimize_banded_toeplitz(total_rounds, bands))
  blt = jp_blt.optimize(
    n=total_rounds, min_sep=min_separation, max_participations=max_participations, max_buffers=bands
  )
  return (_read_only(blt.buf_decay), _read_only(blt.output_scale))


def build_dp_ftrl_mechanism(
  mechanism: str,
  total_rounds: int,
  *,
  min_separation: int = 1,
  max_participations: int | None = None,
  bands: int | None = None,
  strategy: Any = None,
) -> CorrelatedNoiseMechanism:
  """A DP-FTRL noise mechanism for `total_rounds` rounds, optimized by jax-privacy.

  Example:
    >>> mech = fl.aggregators.build_dp_ftrl_mechanism('blt', 100, min_separation=10)
    >>> mech.buffers, mech.sensitivity()

  Args:
    mechanism: `tree`, `banded` or `blt`.
    total_rounds: rounds of the run (the mechanism is optimized, and analysed, for exactly these).
    min_separation: b >= 1: a client joins at most once in any b consecutive rounds
      (`fl.data.sample_cohort(..., min_separation=b)` draws such cohorts).
    max_participations: k: the most rounds a client joins: `ceil(total_rounds / b)`, what
      `fl.data.sample_cohort(min_separation=b)` allows (the default; a larger value is capped, a
      smaller one refused: no sampler enforces it).
    bands: `banded`: the number of bands, 1..b (default b; the state keeps bands - 1 model-sized
      buffers, so memory grows with b); `blt`: the most buffers jax-privacy may use (default 10,
      its own).
    strategy: a precomputed jax-privacy strategy instead of optimizing one: the banded Toeplitz
      coefficients `[bands]` (L2 norm 1) or a `BufferedToeplitz` (or its `(buf_decay,
      output_scale)`), copied read-only. The accountant checks what it is handed.

  Returns:
    A `CorrelatedNoiseMechanism`; optimized strategies are cached per arguments (read-only).

  Raises:
    ValueError: an unknown mechanism, `min_separation` outside [1, total_rounds],
      `max_participations` below `ceil(total_rounds / min_separation)`, `bands` above b
      (banded) or given to the tree, or a malformed strategy.
  """
  if mechanism not in MECHANISMS:
    raise ValueError(f'mechanism must be one of {MECHANISMS}; got {mechanism!r}')
  total_rounds = _check_int('total_rounds', total_rounds, 1)
  min_separation = _check_int('min_separation', min_separation, 1)
  if min_separation > total_rounds:
    raise ValueError(
      f'min_separation must be in [1, total_rounds={total_rounds}]; got {min_separation}. '
      f'Tip: min_separation={total_rounds} already means one participation per client.'
    )
  if max_participations is not None:
    max_participations = _check_int('max_participations', max_participations, 1)
  _check_max_participations(total_rounds, min_separation, max_participations)
  k = max_participations_for(total_rounds, min_separation, max_participations)
  if mechanism == 'tree':
    if bands is not None or strategy is not None:
      raise ValueError('bands and strategy do not apply to the tree mechanism; got one')
    return CorrelatedNoiseMechanism('tree', total_rounds, min_separation, k)
  if mechanism == 'banded':
    if bands is None:
      bands = min_separation if strategy is None else len(np.atleast_1d(strategy))
    bands = _check_int('bands', bands, 1)
    if bands > min_separation:
      raise ValueError(
        f'bands={bands} exceeds min_separation={min_separation}: banded matrix factorization '
        'is analysed for bands <= min_separation (participations b apart see orthogonal '
        'columns). Tip: lower bands or raise min_separation.'
      )
    if strategy is None:
      strategy = _optimized('banded', total_rounds, min_separation, k, bands)
    else:
      strategy = _read_only(strategy)
    if strategy.shape != (bands,) or not np.isclose(np.linalg.norm(strategy), 1.0, atol=1e-5):
      raise ValueError(
        f'a banded strategy must be [bands]=[{bands}] Toeplitz coefficients of L2 norm 1; got '
        f'shape {strategy.shape}, norm {np.linalg.norm(strategy):.6g}'
      )
    return CorrelatedNoiseMechanism('banded', total_rounds, min_separation, k, strategy, bands)
  if bands is not None:
    bands = _check_int('bands', bands, 1)
  if strategy is None:
    bands = 10 if bands is None else bands
    buf_decay, output_scale = _optimized('blt', total_rounds, min_separation, k, bands)
  else:
    if isinstance(strategy, jp_blt.BufferedToeplitz):
      strategy = (strategy.buf_decay, strategy.output_scale)
    buf_decay, output_scale = (_read_only(x) for x in strategy)
  if buf_decay.shape != output_scale.shape:
    raise ValueError(
      f'a BLT strategy needs buf_decay and output_scale of one length; got {buf_decay.shape} '
      f'and {output_scale.shape}'
    )
  if bands is None:
    bands = len(buf_decay)
  elif len(buf_decay) > bands:
    raise ValueError(
      f'the BLT strategy has {len(buf_decay)} buffers; expected at most bands={bands}'
    )
  strategy = (buf_decay, output_scale)
  return CorrelatedNoiseMechanism('blt', total_rounds, min_separation, k, strategy, bands)


def check_matches_mechanism(mechanism: CorrelatedNoiseMechanism, **given: int | None) -> None:
  """Refuses a schedule argument (`total_rounds=`, `min_separation=`, `max_participations=`,
  `bands=`) given explicitly alongside a built `mechanism` with another value than its own: the
  mechanism was built (optimized) and is analysed for its own."""
  for name, value in given.items():
    own = getattr(mechanism, name)
    if value is not None and value != own:
      raise ValueError(
        f'{name}={value} does not match the {mechanism.name} mechanism, built (optimized and '
        f'analysed) for {name}={own}: its guarantee does not cover this schedule. Tip: leave '
        f'{name} unset with a built mechanism, or build the mechanism for {name}={value}.'
      )


class DPFTRLState(NamedTuple):
  """State of the DP-FTRL aggregation.

  Attributes:
    rng: `[2] uint32` key of this round's noise, split every round (from the factory's `seed`,
      the same stream as DP-FedAvg's).
    round_num: `[] int32` rounds aggregated so far.
    noise: the mechanism's streaming state per value leaf (float32): tree `([levels, *shape]
      nodes, [*shape] previous prefix-sum noise)`, banded `[bands - 1, *shape]` past noise
      inputs (and a row counter), BLT `[buffers, *shape]`.
  """

  rng: jax.Array
  round_num: jax.Array
  noise: Any


class DPFTRLFactory:
  """Unweighted DP-FTRL mean: `(Σ clip(v_c) + (C⁺Z)_t) / clients_per_round` at round t.

  Build it with `dp_ftrl_aggregator` (or `DPFTRLFactory.tree_aggregation`, TFF's name). Like
  `DifferentiallyPrivateFactory.gaussian_fixed` it is unweighted: FedAvg's client weights are not
  used. Measurements: `{'dp_query_metrics': {'clip', 'clipped_count'}, 'dp': {}}` as DP-FedAvg's.
  The privacy guarantee is `DPFTRLAccountant`'s business, for the same mechanism and schedule:
  hand it `factory.mechanism`.

  The horizon is `total_rounds` (`factory.total_rounds`): from round index `total_rounds` on
  (the state's `round_num`) the aggregate is all NaN, never a noiseless or unanalysed sum, so a
  run past the mechanism's horizon diverges instead of leaking.
  """

  def __init__(
    self,
    noise_multiplier: float,
    clients_per_round: float,
    clip: float,
    mechanism: CorrelatedNoiseMechanism,
    seed: int,
  ):
    """Use `dp_ftrl_aggregator`."""
    self._noise_multiplier = float(noise_multiplier)
    self._clients_per_round = float(clients_per_round)
    self._clip = float(clip)
    self._mechanism = mechanism
    self._seed = _quantile.check_seed(seed)

  @property
  def mechanism(self) -> CorrelatedNoiseMechanism:
    """The noise mechanism (its strategy, schedule and horizon): `DPFTRLAccountant`'s input."""
    return self._mechanism

  @property
  def total_rounds(self) -> int:
    """The horizon: rounds the mechanism covers; later aggregates are NaN."""
    return self._mechanism.total_rounds

  @classmethod
  def tree_aggregation(
    cls,
    noise_multiplier: float,
    clients_per_round: float,
    l2_norm_clip: float,
    *,
    total_rounds: int,
    min_separation: int = 1,
    seed: int = 0,
  ) -> DPFTRLFactory:
    """TFF's `DifferentiallyPrivateFactory.tree_aggregation` (efficient tree): node noise of
    standard deviation `l2_norm_clip * noise_multiplier`; the state holds a tree for
    `total_rounds` rounds."""
    return dp_ftrl_aggregator(
      noise_multiplier,
      clients_per_round,
      l2_norm_clip,
      mechanism='tree',
      total_rounds=total_rounds,
      min_separation=min_separation,
      seed=seed,
    )

  def create(self, value_spec: Any) -> _processes.AggregationProcess:
    spec = _factories.float_spec(value_spec)
    mechanism, clip, denominator = self._mechanism, self._clip, self._clients_per_round
    stddev, seed = self._noise_multiplier * self._clip, self._seed

    def strong(tree):  # jax-privacy's row counters start weakly typed: fix the state's dtypes
      return jax.tree.map(lambda x: jax.lax.convert_element_type(x, jnp.result_type(x)), tree)

    def initialize():
      noise = strong(jax.tree.map(lambda s: mechanism.init_state(s.shape), spec))
      return DPFTRLState(_quantile.noise_key(seed, _quantile.VALUE_STREAM), jnp.int32(0), noise)

    def client_part(state, value, client_id):
      del state, client_id
      clipped, norm = _robust.clip_by_global_norm(value, jnp.float32(clip))
      return clipped, (norm > clip).astype(jnp.int32)

    def server_part(state, total):
      clipped_sum, clipped_count = total
      key, next_key = jax.random.split(state.rng)
      leaves, treedef = jax.tree.flatten(clipped_sum)
      states = treedef.flatten_up_to(state.noise)
      keys = jax.random.split(key, max(len(leaves), 1))
      # Past the horizon the streamed noise is unanalysed (the tree's is even 0 at round index
      # 2^levels - 1): release NaN instead, so the run diverges rather than leaks.
      past_horizon = state.round_num >= mechanism.total_rounds
      noised, new_states = [], []
      for x, k, s in zip(leaves, keys, states, strict=False):
        noise, s = mechanism.step(k, stddev, s, state.round_num, x.shape)
        mean = (x + noise.astype(x.dtype)) / denominator
        noised.append(jnp.where(past_horizon, jnp.nan, mean).astype(x.dtype))
        new_states.append(strong(s))
      new_state = DPFTRLState(
        next_key, state.round_num + 1, jax.tree.unflatten(treedef, new_states)
      )
      measurements = {
        'dp_query_metrics': {'clip': jnp.float32(clip), 'clipped_count': clipped_count},
        'dp': {},
      }
      return _processes.MeasuredProcessOutput(
        new_state, jax.tree.unflatten(treedef, noised), measurements
      )

    return _processes.AggregationProcess(
      initialize,
      None,
      False,
      client_part=client_part,
      server_part=server_part,
      value_spec=spec,
    )


def dp_ftrl_aggregator(
  noise_multiplier: float,
  clients_per_round: float,
  clip: float,
  *,
  mechanism: str | CorrelatedNoiseMechanism,
  total_rounds: int | None = None,
  min_separation: int | None = None,
  max_participations: int | None = None,
  bands: int | None = None,
  seed: int = 0,
) -> DPFTRLFactory:
  """DP-FTRL aggregation (correlated noise, no sampling assumed) for FedAvg's model updates.

  Example:
    >>> agg = fl.aggregators.dp_ftrl_aggregator(
    ...     1.0, 50, 0.1, mechanism='blt', total_rounds=100, min_separation=10)
    >>> process = fl.algorithms.build_unweighted_fed_avg(
    ...     model, fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0, 0.9),
    ...     model_aggregator=agg)
    >>> eps = fl.aggregators.DPFTRLAccountant(agg.mechanism, 1.0, 1e-5).epsilon(100)

  Rounds past `total_rounds` aggregate to NaN (the mechanism's horizon; see the module
  docstring): build it for the whole run.

  Args:
    noise_multiplier: >= 0: `Z`'s standard deviation over the clip (0: the clipped mean).
    clients_per_round: > 0: the divisor of the noisy sum (the cohort size).
    clip: > 0: every client's update is clipped to this L2 norm.
    mechanism: `tree`, `banded`, `blt`, or a `build_dp_ftrl_mechanism` result (then
      `total_rounds`, `min_separation`, `max_participations` and `bands` are its own: leave them
      None, or give the built mechanism's own values; another value is refused).
    total_rounds: rounds of the run (required with a mechanism name): the horizon.
    min_separation: b: the participation schedule's minimum separation (draw cohorts with
      `fl.data.sample_cohort(..., min_separation=b)`); default 1 with a mechanism name.
    max_participations: k, `ceil(total_rounds / b)` (the default; a smaller k is refused).
    bands: see `build_dp_ftrl_mechanism`.
    seed: keys the noise; give each run (each seed of a sweep) its own, and keep it private.

  Returns:
    A `DPFTRLFactory` with `create(value_spec)`, unweighted.

  Raises:
    ValueError: a bad number, a schedule `build_dp_ftrl_mechanism` refuses, or with a built
      mechanism a `total_rounds`, `min_separation`, `max_participations` or `bands` other than
      its own.
  """
  for name, value in [
    ('noise_multiplier', noise_multiplier),
    ('clients_per_round', clients_per_round),
    ('clip', clip),
  ]:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
      raise ValueError(f'{name} must be a finite number; got {value!r}')
  if noise_multiplier < 0:
    raise ValueError(f'noise_multiplier must be >= 0; got {noise_multiplier}')
  if clients_per_round <= 0 or clip <= 0:
    raise ValueError(f'clients_per_round and clip must be > 0; got {clients_per_round} and {clip}')
  mechanism = resolve_mechanism(
    mechanism,
    total_rounds=total_rounds,
    min_separation=min_separation,
    max_participations=max_participations,
    bands=bands,
  )
  return DPFTRLFactory(noise_multiplier, clients_per_round, clip, mechanism, seed)


def resolve_mechanism(
  mechanism: str | CorrelatedNoiseMechanism,
  *,
  total_rounds: int | None,
  min_separation: int | None,
  max_participations: int | None,
  bands: int | None,
) -> CorrelatedNoiseMechanism:
  """`mechanism` built from its name (`total_rounds` required; `min_separation` default 1), or
  a built one checked to match every argument given (a ValueError names the first that
  differs)."""
  if isinstance(mechanism, CorrelatedNoiseMechanism):
    check_matches_mechanism(
      mechanism,
      total_rounds=total_rounds,
      min_separation=min_separation,
      max_participations=max_participations,
      bands=bands,
    )
    return mechanism
  if total_rounds is None:
    raise ValueError(f'total_rounds is required with mechanism={mechanism!r}; got None')
  return build_dp_ftrl_mechanism(
    mechanism,
    total_rounds,
    min_separation=1 if min_separation is None else min_separation,
    max_participations=max_participations,
    bands=bands,
  )
