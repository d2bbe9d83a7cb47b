"""Synthetic(α, β): the FedProx paper's generated federated data (Li et al., 2020, "Federated
Optimization in Heterogeneous Networks", Section 5.1), the usual test of statistical
heterogeneity. Nothing is downloaded; a seed makes the same population.

Client k draws a model and an input distribution: `u_k ~ N(0, α)`, `B_k ~ N(0, β)`,
`W_k [60, 10] ~ N(u_k, 1)`, `b_k [10] ~ N(u_k, 1)`, `v_k [60] ~ N(B_k, 1)`; its examples are
`x ~ N(v_k, Σ)` with `Σ` diagonal, `Σ_jj = j^-1.2`, labelled `y = argmax(W_kᵀ x + b_k)`. α sets
how much the clients' models differ, β how much their inputs do. The IID variant shares one
`W, b ~ N(0, 1)` and one input distribution `v = 0`. Client sizes follow the paper's code:
`floor(lognormal(4, 2)) + 50` examples, split 90% / 10% into train and test per client. The
normal draws take α and β as standard deviations, as the paper's released generator does
(the paper writes variances; at α = β = 1, the usual setting, the two agree).
"""

from __future__ import annotations

import numpy as np

from fedjax_lite.data._federated_data import InMemoryFederatedData

NUM_FEATURES = 60
NUM_CLASSES = 10
TRAIN_FRACTION = 0.9


def synthetic_fedprox(
  alpha: float, beta: float, *, iid: bool = False, num_clients: int = 30, seed: int = 0
) -> tuple[InMemoryFederatedData, InMemoryFederatedData]:
  """`(train, test)` populations of Synthetic(α, β), clients `0..num_clients-1` in both.

  Args:
    alpha: spread of the clients' models (0: the same prior mean for every client).
    beta: spread of the clients' inputs.
    iid: one model and one input distribution for every client (the paper's Synthetic-IID).
    num_clients: clients (the paper: 30).
    seed: the population's seed.

  Returns:
    Populations whose clients hold `{'x': [n, 60] float32, 'y': [n] int32}` (10 classes).
  """
  for name, value in [('alpha', alpha), ('beta', beta)]:
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
      raise ValueError(f'{name} must be a number >= 0; got {value!r}')
  if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
    raise ValueError(f'num_clients must be an int >= 1; got {num_clients!r}')
  rng = np.random.default_rng(seed)
  sizes = rng.lognormal(4, 2, num_clients).astype(np.int64) + 50
  model_means = rng.normal(0, alpha, num_clients)
  input_means = rng.normal(0, beta, num_clients)
  scale = np.arange(1, NUM_FEATURES + 1, dtype=np.float64) ** -0.6  # Σ_jj = j^-1.2
  shared_w = rng.normal(0, 1, (NUM_FEATURES, NUM_CLASSES))
  shared_b = rng.normal(0, 1, NUM_CLASSES)
  train, test = {}, {}
  for k in range(num_clients):
    if iid:
      w, b, v = shared_w, shared_b, np.zeros(NUM_FEATURES)
    else:
      w = rng.normal(model_means[k], 1, (NUM_FEATURES, NUM_CLASSES))
      b = rng.normal(model_means[k], 1, NUM_CLASSES)
      v = rng.normal(input_means[k], 1, NUM_FEATURES)
    x = v + scale * rng.standard_normal((sizes[k], NUM_FEATURES))
    y = np.argmax(x @ w + b, axis=1).astype(np.int32)
    cut = int(TRAIN_FRACTION * sizes[k])
    train[k] = {'x': x[:cut].astype(np.float32), 'y': y[:cut]}
    test[k] = {'x': x[cut:].astype(np.float32), 'y': y[cut:]}
  return InMemoryFederatedData(train), InMemoryFederatedData(test)
