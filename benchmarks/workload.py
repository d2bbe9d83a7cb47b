"""The reference workload of benchmarks/WORKLOAD.md, shared by every benchmark: its constants,
its synthetic population (a `fl.data.FederatedData`), its models and the simple baselines a
round is compared with (Python loops, the centralized bound)."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import fedjax_lite as fl

# Change nothing here without changing WORKLOAD.md.
NUM_CLASSES = 62
IMAGE_SHAPE = (28, 28, 1)
NUM_FEATURES = 28 * 28
NOISE_SCALE = 0.35
POPULATION = 1000
COHORT = 100
HOMO_SIZE = 64
HETERO_RANGE = (10, 200)  # inclusive
BATCH_SIZE = 16
DP_BATCH_SIZE = 1600  # data-parallel ceiling: 100 x 16
CLIENT_LR = 0.1
SERVER_LR = 1.0
MLP_PARAMS = 209_662
CNN_PARAMS = 1_206_590
CHECK_TOL = 1e-4


class SyntheticEmnist(fl.data.FederatedData):
  """WORKLOAD.md's population; each client's examples made on demand from its own seed.

  Prototypes: `default_rng(0)`, U(0, 1) of shape 28x28x1 for each of 62 classes. Client c's
  labels and noise come from `default_rng([0, c])`, so a client's data is the same whenever it is
  made and the population never has to be held at once. `uint8=True` stores pixels as bytes
  (turn them into floats with the `to_float` batch hook), as a population on disk would.

  Args:
    sizes: `[clients]` examples per client (see `variant` and `power_law`).
    uint8: pixels as uint8 in [0, 255] instead of float32 in [0, 1].
  """

  def __init__(self, sizes: np.ndarray, uint8: bool = False):
    super().__init__()
    self._sizes = np.asarray(sizes, np.int64)
    self._uint8 = uint8
    prototypes = np.random.default_rng(0).random((NUM_CLASSES, *IMAGE_SHAPE))
    self._prototypes = prototypes.astype(np.float32).reshape(NUM_CLASSES, NUM_FEATURES)

  @classmethod
  def variant(cls, name: str, population: int = POPULATION, uint8: bool = False):
    """`homo` (64 examples each) or `hetero` (`default_rng(0).integers(10, 200, inclusive)`)."""
    if name == 'homo':
      return cls(np.full(population, HOMO_SIZE, np.int64), uint8)
    if name == 'hetero':
      low, high = HETERO_RANGE
      return cls(np.random.default_rng(0).integers(low, high, population, endpoint=True), uint8)
    raise ValueError(f"variant must be 'homo' or 'hetero'; got {name!r}")

  @classmethod
  def power_law(cls, population: int, mean_size: int, exponent: float, min_size: int):
    """Sizes of `fl.data.power_law_partition` (seed 0), pixels as uint8."""
    parts = fl.data.power_law_partition(
      mean_size * population, population, exponent, min_size=min_size, seed=0
    )
    return cls(np.array([len(p) for p in parts], np.int64), uint8=True)

  @property
  def client_ids(self) -> range:
    return range(len(self._sizes))

  @property
  def client_sizes(self) -> np.ndarray:
    return self._sizes

  def _read(self, client_id) -> dict[str, np.ndarray]:
    """x `[n, 784]` (float32 in [0, 1], or uint8), y `[n]` int32."""
    rng = np.random.default_rng([0, int(client_id)])
    n = int(self._sizes[client_id])
    y = rng.integers(0, NUM_CLASSES, size=n).astype(np.int32)
    noise = rng.standard_normal((n, NUM_FEATURES), dtype=np.float32)
    x = np.clip(self._prototypes[y] + np.float32(NOISE_SCALE) * noise, 0.0, 1.0)
    if self._uint8:
      x = np.round(x * 255).astype(np.uint8)
    return {'x': x, 'y': y}


def to_float(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The per-batch hook of a uint8 population: pixels back to float32 in [0, 1]."""
  return {'x': batch['x'].astype(np.float32) / np.float32(255), 'y': batch['y']}


def cohort_ids(round_num: int, population: int = POPULATION, cohort: int = COHORT) -> np.ndarray:
  """Round r's cohort: `default_rng(1000 + r).choice(population, cohort, replace=False)`."""
  return np.random.default_rng(1000 + round_num).choice(population, cohort, replace=False)


def num_params(model: fl.FunctionalModel) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(model.initial_weights.trainable))


def build_mlp() -> fl.FunctionalModel:
  model = fl.models.mlp_classifier(NUM_FEATURES, NUM_CLASSES, hidden=(200, 200))
  assert num_params(model) == MLP_PARAMS, num_params(model)
  return model


def build_cnn(seed: int = 0) -> fl.FunctionalModel:
  """The EMNIST CNN: conv3x3x32, conv3x3x64 (VALID, ReLU), maxpool 2x2, dense 128 (ReLU), 62."""
  model = fl.models.cnn_classifier(IMAGE_SHAPE, NUM_CLASSES, seed=seed)
  assert num_params(model) == CNN_PARAMS, num_params(model)
  return model


def as_model_input(model_name: str, client: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  if model_name == 'cnn':
    return {'x': client['x'].reshape(-1, *IMAGE_SHAPE), 'y': client['y']}
  return client


def make_local_sgd(model: fl.FunctionalModel, learning_rate: float):
  """`(trainable, x [steps, b, ...], y [steps, b], mask [steps, b]) -> trainable` via lax.scan."""
  non_trainable = model.initial_weights.non_trainable

  def loss_fn(trainable, x, y, mask):
    logits = model.predict_on_batch(fl.ModelWeights(trainable, non_trainable), x, True)
    return model.loss(logits, y, mask)

  def step(trainable, batch):
    grads = jax.grad(loss_fn)(trainable, *batch)
    return jax.tree.map(lambda w, g: w - learning_rate * g, trainable, grads), None

  def local_sgd(trainable, x, y, mask):
    return lax.scan(step, trainable, (x, y, mask))[0]

  return local_sgd


class PythonLoopFedAvg:
  """(b): a loop over clients; each a jitted scan over its own steps; weighted sum on device."""

  def __init__(self, model: fl.FunctionalModel):
    local_sgd = make_local_sgd(model, CLIENT_LR)

    def client_update(global_trainable, acc, x, y, mask):
      trainable = local_sgd(global_trainable, x, y, mask)
      n = jnp.sum(mask)
      return jax.tree.map(lambda a, w: a + n * w, acc, trainable)

    self.client_update = jax.jit(client_update)
    self.finish = jax.jit(
      lambda acc, total, global_trainable: jax.tree.map(
        lambda a, g: g + SERVER_LR * (a / total - g), acc, global_trainable
      )
    )
    self.zeros = jax.jit(lambda t: jax.tree.map(jnp.zeros_like, t))

  def round(self, trainable, client_batches: fl.ClientBatches):
    mask = client_batches.mask
    steps = np.count_nonzero(mask.any(axis=2), axis=1)
    acc = self.zeros(trainable)
    for i, s in enumerate(steps):
      acc = self.client_update(
        trainable,
        acc,
        client_batches.batch['x'][i, :s],
        client_batches.batch['y'][i, :s],
        mask[i, :s],
      )
    return self.finish(acc, float(mask.sum()), trainable)


class PythonStepLoopFedAvg:
  """(e): a loop over clients and over each client's batches calling one jitted SGD step.

  What a researcher writes first (and FedJAX's `fed_avg` does): one dispatch per batch.
  """

  def __init__(self, model: fl.FunctionalModel):
    non_trainable = model.initial_weights.non_trainable

    def step(trainable, x, y):
      def loss_fn(trainable):
        logits = model.predict_on_batch(fl.ModelWeights(trainable, non_trainable), x, True)
        return model.loss(logits, y)

      grads = jax.grad(loss_fn)(trainable)
      return jax.tree.map(lambda w, g: w - CLIENT_LR * g, trainable, grads)

    self.step = jax.jit(step)
    self.accumulate = jax.jit(lambda acc, n, w: jax.tree.map(lambda a, b: a + n * b, acc, w))
    self.finish = jax.jit(
      lambda acc, total, global_trainable: jax.tree.map(
        lambda a, g: g + SERVER_LR * (a / total - g), acc, global_trainable
      )
    )

  def round(self, trainable, client_batches: fl.ClientBatches):
    mask = client_batches.mask
    acc = jax.tree.map(jnp.zeros_like, trainable)
    for i in range(mask.shape[0]):
      local = trainable
      for s in range(mask.shape[1]):
        real = mask[i, s] > 0
        if not real.any():
          break
        local = self.step(
          local, client_batches.batch['x'][i, s][real], client_batches.batch['y'][i, s][real]
        )
      acc = self.accumulate(acc, float(mask[i].sum()), local)
    return self.finish(acc, float(mask.sum()), trainable)


def real_examples(batches: fl.ClientBatches) -> list[dict[str, np.ndarray]]:
  """Each client's real (unpadded) examples of a cohort's batches, `{'x', 'y'}` per client."""
  return [
    {'x': np.asarray(x)[m > 0], 'y': np.asarray(y)[m > 0]}
    for x, y, m in zip(batches.batch['x'], batches.batch['y'], batches.mask, strict=True)
  ]


def pooled_batches(clients, batch_size: int, seed: Sequence[int]):
  """The cohort's examples pooled, shuffled, cut into `[steps, batch_size, ...]` with a mask."""
  x = np.concatenate([c['x'] for c in clients])
  y = np.concatenate([c['y'] for c in clients])
  n = len(y)
  order = np.random.default_rng(list(seed)).permutation(n)
  steps = -(-n // batch_size)
  pad = steps * batch_size - n
  x = np.concatenate([x[order], np.zeros((pad, *x.shape[1:]), x.dtype)])
  y = np.concatenate([y[order], np.zeros((pad,), y.dtype)])
  mask = np.concatenate([np.ones(n, np.float32), np.zeros(pad, np.float32)])
  shape = (steps, batch_size)
  return x.reshape(*shape, *x.shape[1:]), y.reshape(shape), mask.reshape(shape)


class Centralized:
  """(c) and (d): one model, one jitted scan over the pooled examples, compiled ahead of time."""

  def __init__(self, model: fl.FunctionalModel, batch_size: int):
    self.batch_size = batch_size
    self.jitted = jax.jit(make_local_sgd(model, CLIENT_LR))
    self.compiled = {}

  def prepare(self, trainable, clients, round_num: int):
    """Untimed: pool, shuffle, pad, put on the device, compile for this shape."""
    x, y, mask = jax.device_put(pooled_batches(clients, self.batch_size, (1, round_num)))
    key = x.shape
    if key not in self.compiled:
      self.compiled[key] = self.jitted.lower(trainable, x, y, mask).compile()
    jax.block_until_ready((x, y, mask))
    return self.compiled[key], (x, y, mask)


def max_abs_diff(a, b) -> float:
  return max(
    float(jnp.max(jnp.abs(x - y)))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  )
