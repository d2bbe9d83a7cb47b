"""Dataset split functions against TFF's semantics written as a Python list reference."""

import itertools

import jax
import numpy as np
import pytest

import fedjax_lite as fl
import fedjax_lite.reconstruction


def _client_batches():
  """3 clients of 7, 2 and 0 examples, batch 2, plus an empty step inside client 1's data."""
  clients = [
    {'x': np.arange(100 * c, 100 * c + n, dtype=np.float32)[:, None], 'y': np.zeros(n, np.int32)}
    for c, n in enumerate([7, 2, 0])
  ]
  cb = fl.data.build_client_batches(clients, batch_size=2, shuffle=False, num_steps=5)
  batch = jax.tree.map(np.array, cb.batch)
  mask = np.array(cb.mask)
  # Client 1: its one batch moves to step 2; steps 0-1 and 3-4 hold no real example.
  batch['x'][1, 2], mask[1, 2] = batch['x'][1, 0], mask[1, 0]
  batch['x'][1, 0], mask[1, 0] = 0, 0
  # Client 1 also gets a second batch at step 4 (one example).
  batch['x'][1, 4, 0], mask[1, 4, 0] = 150, 1
  return fl.ClientBatches(batch, mask)


def _real_batches(cb, c):
  """A client's batches as TFF's dataset would yield them: lists of example values."""
  x, mask = np.asarray(cb.batch['x'])[c, :, :, 0], np.asarray(cb.mask)[c]
  return [list(x[s][mask[s] > 0]) for s in range(mask.shape[0]) if mask[s].any()]


def _reference(batches, epochs, steps_max, split, part):
  if split:
    batches = batches[part::2]
  seq = [b for _ in range(epochs) for b in batches]
  return seq if steps_max is None else seq[:steps_max]


@pytest.mark.parametrize(
  ('recon_epochs', 'recon_max', 'post_epochs', 'post_max', 'split'),
  [
    (1, None, 1, None, False),
    (1, None, 1, None, True),
    (3, 4, 2, None, True),
    (2, None, 1, 1, False),
    (1, 1, 3, 5, True),
  ],
)
def test_split_matches_tff_semantics(recon_epochs, recon_max, post_epochs, post_max, split):
  cb = _client_batches()
  split_fn = fl.reconstruction.build_dataset_split_fn(
    recon_epochs=recon_epochs,
    recon_steps_max=recon_max,
    post_recon_epochs=post_epochs,
    post_recon_steps_max=post_max,
    split_dataset=split,
  )
  parts = jax.jit(split_fn)(cb)
  settings = [(recon_epochs, recon_max), (post_epochs, post_max)]
  for part, (out, (epochs, steps_max)) in enumerate(zip(parts, settings, strict=True)):
    assert isinstance(out, fl.ClientBatches)
    for c in range(3):
      expected = _reference(_real_batches(cb, c), epochs, steps_max, split, part)
      got = _real_batches(out, c)
      if not (not split and epochs == 1 and steps_max is None):
        # Packed: the real batches first, then padding only (zeroed).
        mask = np.asarray(out.mask)[c]
        real = mask.any(axis=1)
        assert list(real) == sorted(real, reverse=True)
        assert np.all(np.asarray(out.batch['x'])[c][mask == 0] == 0)
      assert got == expected, (part, c)


def test_split_shapes_are_static_bounds():
  cb = _client_batches()  # 5 steps
  split_fn = fl.reconstruction.build_dataset_split_fn(
    recon_epochs=3, recon_steps_max=7, post_recon_epochs=2, split_dataset=True
  )
  recon, post = jax.jit(split_fn)(cb)
  assert recon.mask.shape == (3, 7, 2) and post.mask.shape == (3, 4, 2)  # min(3·3, 7), 2·2
  assert recon.batch['x'].shape == (3, 7, 2, 1)
  # One step and a split: the post part still has one (empty) step.
  one = fl.ClientBatches(jax.tree.map(lambda x: x[:, :1], cb.batch), cb.mask[:, :1])
  recon, post = jax.jit(fl.reconstruction.build_dataset_split_fn(split_dataset=True))(one)
  assert post.mask.shape == (3, 1, 2) and not np.asarray(post.mask).any()
  assert fl.reconstruction.simple_dataset_split_fn(cb) == (cb, cb)


@pytest.mark.parametrize(
  ('kwargs', 'match'),
  [
    ({'recon_epochs': 0}, 'recon_epochs must be an int >= 1'),
    ({'post_recon_steps_max': 0}, r'post_recon_steps_max must be an int >= 1 or None'),
    ({'recon_steps_max': 2.5}, 'recon_steps_max'),
    ({'split_dataset': 1}, 'split_dataset must be a bool'),
  ],
)
def test_bad_arguments(kwargs, match):
  with pytest.raises((ValueError, TypeError), match=match):
    fl.reconstruction.build_dataset_split_fn(**kwargs)


def test_counts_with_itertools_reference():
  # A client whose 5 batches are all real: even/odd assignment by batch index.
  clients = [{'x': np.arange(10, dtype=np.float32)[:, None], 'y': np.zeros(10, np.int32)}]
  cb = fl.data.build_client_batches(clients, batch_size=2, shuffle=False)
  split_fn = fl.reconstruction.build_dataset_split_fn(split_dataset=True, recon_epochs=2)
  recon, post = jax.jit(split_fn)(cb)
  flat = lambda part: list(itertools.chain(*_real_batches(part, 0)))
  assert flat(recon) == [0, 1, 4, 5, 8, 9] * 2
  assert flat(post) == [2, 3, 6, 7]
