"""Recurrent language models of TFF's baselines as flax modules, and their masked token loss.

Shakespeare (char_prediction_models.py): embedding 8, two LSTM layers of 256, a dense layer over
the vocabulary. Stack Overflow (word_prediction_models.py): embedding 96, one LSTM of 670, a
dense layer back to 96, a dense layer over the extended vocabulary. The LSTM is flax's
`nn.RNN(nn.OptimizedLSTMCell)` scanned over time; initializers follow Keras's defaults (see
`LSTMLanguageModel`). Keras's `mask_zero` embedding is not needed: TFF's pad (0) only ever
trails a sequence, so it cannot reach the outputs at real positions, and the loss and metrics
mask it.
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
  Shakespeare model, or 'glorot_uniform', Keras's default), recurrent kernels orthogonal, biases
  zero with the forget gate's at 1 (`unit_forget_bias`), dense layers Glorot uniform.

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


def masked_token_cross_entropy(masked_ids: Sequence[int] = (0,)):
  """A `loss_fn`: softmax cross-entropy of logits `[batch_size, L, vocab]` and labels
  `[batch_size, L]`, averaged over the batch's tokens whose label is not in `masked_ids` (Keras's
  masked `SparseCategoricalCrossentropy`, as TFF's sequence tasks train); padded examples
  (`sample_weight` 0) count in nothing."""
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
