"""Recurrent language models of TFF's baselines as flax modules, and their masked token loss.

Shakespeare (char_prediction_models.py): embedding 8, two LSTM layers of 256, a dense layer over
the vocabulary. Stack Overflow (word_prediction_models.py): embedding 96, one LSTM of 670, a
dense layer back to 96, a dense layer over the extended vocabulary. The LSTM is flax's
`nn.RNN(nn.OptimizedLSTMCell)` scanned over time; initializers follow Keras's defaults (see
`LSTMLanguageModel`). Keras's `mask_zero` embedding is not needed for the outputs: TFF's pad (0)
only ever trails a sequence, so it cannot reach the outputs at real positions.

Which positions the loss scores: Keras's `mask_zero=True` masks the positions whose *input* is
pad, and recent Keras 2's `Loss.__call__` averages over the positions the prediction's mask
keeps, so TFF's loss also scores the one position per sequence whose input is EOS and whose
label is pad (a sequence cut at its length has none). `input_masked_token_cross_entropy` is
that loss; the tasks' forward pass uses it. `masked_token_cross_entropy`, which sees only the
labels, masks positions whose *label* is pad instead (it leaves that EOS -> pad position out),
for callers without the inputs (`FunctionalModel.loss`). The metrics mask by label, as TFF's
do.

The recurrent kernels' init approximates Keras's: flax's `OptimizedLSTMCell` draws an
orthogonal `[units, units]` matrix per gate, Keras one orthogonal `[units, 4 * units]` matrix
for the four gates fused (orthonormal rows over all four gates, so each gate's slice is not
orthogonal and its rows have norms near 1/2, not 1). The input kernels' Glorot limit is
computed over Keras's fused shape (`_keras_lstm_glorot`), so that one matches.
"""

from __future__ import annotations

from collections.abc import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedjax_lite.models import _losses


def _keras_embedding_init(key, shape, dtype=jnp.float32):
  """Keras's `Embedding` default: uniform in [-0.05, 0.05)."""
  return jax.random.uniform(key, shape, dtype, -0.05, 0.05)


def _keras_lstm_glorot(gates: int = 4):
  """Keras's LSTM kernel init (Glorot uniform over its fused `[in, 4 * units]` kernel), for one
  gate's `[in, units]` slice."""

  def init(key, shape, dtype=jnp.float32):
    limit = (6.0 / (shape[0] + gates * shape[1])) ** 0.5
    return jax.random.uniform(key, shape, dtype, -limit, limit)

  return init


class LSTMLanguageModel(nn.Module):
  """Embedding, LSTM layers (each optionally projected by a dense layer), dense logits.

  Input `[batch_size, L]` int ids, output `[batch_size, L, vocab_size]` logits. Keras's
  initializers: embedding uniform ±0.05, LSTM input kernels `kernel_init` ('he_normal' as TFF's
  Shakespeare model, or 'glorot_uniform', Keras's default), recurrent kernels orthogonal per gate
  (approximate: Keras's is orthogonal over the four gates fused, see the module's docstring),
  biases zero with the forget gate's at 1 (`unit_forget_bias`), dense layers Glorot uniform.

  Attributes:
    vocab_size: ids in and logits out.
    embedding_size: embedding width.
    lstm_sizes: one LSTM layer per entry.
    projection_size: when set, a dense layer of this width after each LSTM (Stack Overflow).
    kernel_init: 'he_normal' or 'glorot_uniform'.
  """

  vocab_size: int
  embedding_size: int
  lstm_sizes: Sequence[int]
  projection_size: int | None = None
  kernel_init: str = 'glorot_uniform'

  @nn.compact
  def __call__(self, x):
    h = nn.Embed(self.vocab_size, self.embedding_size, embedding_init=_keras_embedding_init)(x)
    dense_init = nn.initializers.glorot_uniform()
    for units in self.lstm_sizes:
      kernel_init = (
        nn.initializers.he_normal() if self.kernel_init == 'he_normal' else _keras_lstm_glorot()
      )
      cell = nn.OptimizedLSTMCell(units, kernel_init=kernel_init)
      h = nn.RNN(cell)(h)
      if self.projection_size is not None:
        h = nn.Dense(self.projection_size, kernel_init=dense_init)(h)
    return nn.Dense(self.vocab_size, kernel_init=dense_init)(h)


def unit_forget_bias(params):
  """`params` with every `OptimizedLSTMCell`'s forget-gate bias ('hf') set to 1 (Keras's
  `unit_forget_bias=True`)."""
  if isinstance(params, dict):
    return {
      k: (
        {**v, 'bias': jnp.ones_like(v['bias'])}
        if k == 'hf' and isinstance(v, dict) and 'bias' in v
        else unit_forget_bias(v)
      )
      for k, v in params.items()
    }
  return params


def input_masked_token_cross_entropy(pad: int = 0):
  """TFF's sequence loss, `(logits, inputs, labels, sample_weight=None) -> []`: softmax
  cross-entropy of logits `[batch_size, L, vocab]` and labels `[batch_size, L]`, averaged over
  the positions whose input (`inputs` `[batch_size, L]`) is not `pad`, as Keras's
  `Embedding(mask_zero=True)` masks them (the position after EOS, whose label is pad, counts);
  padded examples (`sample_weight` 0) count in nothing."""

  def loss(logits, inputs, labels, sample_weight=None):
    labels = labels.astype(jnp.int32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = (inputs != pad).astype(per_token.dtype)
    if sample_weight is not None:
      w = w * sample_weight.astype(per_token.dtype)[:, None]
    return _losses.weighted_mean(per_token.reshape(-1), w.reshape(-1))

  return loss


def masked_token_cross_entropy(masked_ids: Sequence[int] = (0,)):
  """A `loss_fn`: softmax cross-entropy of logits `[batch_size, L, vocab]` and labels
  `[batch_size, L]`, averaged over the batch's tokens whose label is not in `masked_ids` (Keras's
  masked `SparseCategoricalCrossentropy` where the labels carry the mask); padded examples
  (`sample_weight` 0) count in nothing. TFF's tasks mask by input instead
  (`input_masked_token_cross_entropy`): with `masked_ids=(pad,)` this differs from it only at
  the position after EOS."""
  masked_ids = tuple(masked_ids)

  def loss(logits, labels, sample_weight=None):
    labels = labels.astype(jnp.int32)
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    w = jnp.ones(labels.shape, per_token.dtype)
    if sample_weight is not None:
      w = w * sample_weight.astype(per_token.dtype)[:, None]
    for token in masked_ids:
      w = w * (labels != token)
    return _losses.weighted_mean(per_token.reshape(-1), w.reshape(-1))

  return loss
