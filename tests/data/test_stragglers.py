"""Stragglers (FedProx's systems heterogeneity) and Synthetic(α, β), against numpy."""

import jax
import numpy as np
import numpy_reference as ref
import pytest

import fedjax_lite as fl

SIZES = [7, 12, 5, 9, 3, 10]


def _batches(seed=0, num_epochs=2):
  clients = ref.random_clients(SIZES, seed=seed)
  return fl.data.build_client_batches(
    clients, batch_size=4, num_epochs=num_epochs, num_steps=6, seed=seed
  )


def _process():
  return fl.algorithms.build_weighted_fed_avg(
    ref.linear_model(5, 3), fl.optimizers.build_sgdm(0.1), fl.optimizers.build_sgdm(1.0)
  )


def test_the_work_draw_follows_the_paper_and_the_seed():
  work = fl.data.straggler_work(10, 0.5, 20, round_num=3, seed=1)
  assert (work < 1).sum() == 5  # 10 - round(10 * 0.5)
  epochs = work[work < 1] * 20
  assert np.allclose(epochs, np.round(epochs)) and epochs.min() >= 1 and epochs.max() <= 19
  np.testing.assert_array_equal(work, fl.data.straggler_work(10, 0.5, 20, round_num=3, seed=1))
  assert not np.array_equal(work, fl.data.straggler_work(10, 0.5, 20, round_num=4, seed=1))
  one_epoch = fl.data.straggler_work(10, 0.9, 1, round_num=0)
  assert (one_epoch < 1).sum() == 9 and (one_epoch > 0).all()
  assert (fl.data.straggler_work(10, 0.0, 20, round_num=0) == 1).all()
  with pytest.raises(ValueError, match=r'fraction must be a number in \[0, 1\); got 1'):
    fl.data.straggler_work(10, 1, 20, round_num=0)


def _numpy_round(w, b, client_batches, budgets, lr=0.1):
  """FedAvg where client c trains on its first `budgets[c]` examples, batch by batch."""
  deltas, weights = [], []
  for c, budget in enumerate(budgets):
    cw, cb, left = w.copy(), b.copy(), budget
    for x, y in ref.real_batches(client_batches, c):
      if left <= 0:
        break
      x, y = x[:left], y[:left]
      left -= len(y)
      _, gw, gb, _ = ref.loss_and_grads(cw, cb, x, y)
      cw, cb = cw - lr * gw, cb - lr * gb
    deltas.append((w - cw, b - cb))
    weights.append(budget)
  total = sum(weights)
  dw = sum(k * d[0] for k, d in zip(weights, deltas, strict=True)) / total
  db = sum(k * d[1] for k, d in zip(weights, deltas, strict=True)) / total
  return w - dw, b - db


def test_a_stragglers_partial_update_is_its_budgeted_training():
  process, batches = _process(), _batches()
  state = process.initialize()
  work = np.array([1.0, 0.5, 0.25, 1.0, 0.5, 0.1])
  straggled = fl.data.apply_straggler_work(batches, work, 'partial')
  real = (np.asarray(batches.mask) > 0).reshape(len(SIZES), -1).sum(axis=1)  # 2 epochs each
  budgets = np.maximum(np.ceil(work * real), 1).astype(int)
  assert (np.asarray(straggled.mask) > 0).reshape(len(SIZES), -1).sum(axis=1).tolist() == list(
    budgets
  )
  new, _ = process.next(state, straggled)
  weights = state.global_model_weights.trainable
  w, b = (np.asarray(weights[k], np.float64) for k in ('w', 'b'))
  want_w, want_b = _numpy_round(w, b, batches, budgets)
  got = new.global_model_weights.trainable
  np.testing.assert_allclose(got['w'], want_w, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got['b'], want_b, rtol=1e-5, atol=1e-6)


def test_dropping_stragglers_is_fed_avg_over_the_others_and_never_recompiles():
  process, batches = _process(), _batches()
  state = process.initialize()
  work = fl.data.straggler_work(len(SIZES), 0.5, 2, round_num=0, seed=0)
  dropped, _ = process.next(state, fl.data.apply_straggler_work(batches, work, 'drop'))
  kept = np.flatnonzero(work == 1)
  others = jax.tree.map(lambda x: np.asarray(x)[kept], batches)
  expected, _ = process.next(state, others)
  for a, b in zip(jax.tree.leaves(dropped), jax.tree.leaves(expected), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  for round_num in range(1, 4):  # other draws, other policies: the same program
    work = fl.data.straggler_work(len(SIZES), 0.5, 2, round_num=round_num)
    for policy in ('drop', 'partial'):
      state, _ = process.next(state, fl.data.apply_straggler_work(batches, work, policy))
  assert process.next._cache_size() == 2  # the 6-client cohort and the kept clients' one


def test_synthetic_is_deterministic_heterogeneous_and_well_formed():
  train, test = fl.data.synthetic_fedprox(1, 1, seed=0)
  again, _ = fl.data.synthetic_fedprox(1, 1, seed=0)
  assert train.num_clients == test.num_clients == 30
  first = train.get_client(0)
  np.testing.assert_array_equal(first['x'], again.get_client(0)['x'])
  assert first['x'].shape[1:] == (60,) and first['x'].dtype == np.float32
  sizes = train.client_sizes + test.client_sizes
  assert sizes.min() >= 50
  labels = [
    np.bincount(train.get_client(k)['y'], minlength=10) / train.client_sizes[k] for k in range(30)
  ]
  iid_train, _ = fl.data.synthetic_fedprox(0, 0, iid=True, seed=0)
  iid = [
    np.bincount(iid_train.get_client(k)['y'], minlength=10) / iid_train.client_sizes[k]
    for k in range(30)
  ]
  # Clients' label mixes spread far more in Synthetic(1, 1) than in Synthetic-IID.
  assert np.std(labels, axis=0).mean() > 2 * np.std(iid, axis=0).mean()
  assert fl.data.get_dataset('synthetic_1_1').available()
