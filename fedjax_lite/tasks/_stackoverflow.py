"""Stack Overflow next-word and tag prediction (`tff.simulation.baselines.stackoverflow`)."""

from __future__ import annotations

import json

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.data import _stackoverflow, _tff_h5
from fedjax_lite.models import _flax, _recurrent
from fedjax_lite.tasks import _common, _reddi, _task

# constants.py (TFF's defaults; Reddi et al. 2021 use the same).
WORD_VOCAB_SIZE = 10_000
TAG_VOCAB_SIZE = 500
SEQUENCE_LENGTH = 20
# Reddi et al. 2021 (so_*_max_elements_per_user): at most 1000 posts of a training client.
MAX_ELEMENTS_PER_USER = 1000
SPLITS = ('train', 'held_out', 'test')
_TFF_FILE = f'{_common.TFF_BASELINES}/stackoverflow'
_DATA = 'TFF stackoverflow_{train,held_out,test}.h5 (The TensorFlow Federated Authors 2019)'


def _h5_files() -> tuple[_task.DataFile, ...]:
  origin = _common.ORIGIN.format('stackoverflow')
  return tuple(
    _task.DataFile(f'stackoverflow_{s}.h5', origin, required=s != 'held_out') for s in SPLITS
  )


def _vocab_file(name: str) -> _task.DataFile:
  return _task.DataFile(name, _common.ORIGIN.format(name))


def _read_populations(found) -> dict:
  return {
    s: _tff_h5.load_tff_h5(found[f'stackoverflow_{s}.h5'])
    for s in SPLITS
    if f'stackoverflow_{s}.h5' in found
  }


def _prepare(name, populations, train_hook, eval_hook) -> _task.TaskData:
  _task.check_splits(populations, ('train', 'test'), name)
  validation = populations.get('held_out')
  return _task.TaskData(
    train=populations['train'].preprocess_client(train_hook),
    test=populations['test'].preprocess_client(eval_hook),
    validation=None if validation is None else validation.preprocess_client(eval_hook),
  )


def _words(text: str, size: int, name: str) -> list[str]:
  """The first `size` words of a `stackoverflow.word_count` text; raises when there are fewer."""
  words = [line.split()[0] for line in text.splitlines() if line.strip()][:size]
  if len(words) < size:
    raise ValueError(f'{name} has {len(words)} words; expected at least {size}')
  return words


def _read_words(found, size) -> list[str]:
  path = found[_stackoverflow.WORD_COUNT_FILE]
  words = list(_stackoverflow.load_stackoverflow_word_counts(path, size))
  if len(words) < size:
    raise ValueError(f'{path} has {len(words)} words; expected at least {size}')
  return words


def _generate(num_clients: int, seed: int) -> tuple[dict, dict]:
  """Stand-in posts over a generated vocabulary `w0..w9999` (and tags `t0..t499`), with some
  out-of-vocabulary words and tags; the vocabulary files' texts in TFF's formats."""
  rng = np.random.default_rng([seed, 10_000])
  raw = {}
  sizes = {
    'train': num_clients,
    'held_out': max(1, num_clients // 2),
    'test': max(1, num_clients // 2),
  }
  for split, n_clients in sizes.items():
    raw[split] = {}
    for i, n in enumerate(_common.client_sizes(rng, n_clients, 2, 5)):

      def sentence(low, high):
        k = int(rng.integers(low, high + 1))
        ids = rng.integers(0, 300, k)
        return ' '.join(f'oov{j}' if rng.random() < 0.1 else f'w{j}' for j in ids)

      tags = ['|'.join(f't{t}' for t in rng.choice(520, int(rng.integers(1, 4)), replace=False))
              for _ in range(n)]  # fmt: skip
      raw[split][f'{1000 * i + 7}'] = {
        'creation_date': _common.text_array(['2010-01-01 00:00:00.000+00:00'] * n),
        'score': rng.integers(-2, 10, n).astype(np.int64),
        'tags': _common.text_array(tags),
        'title': _common.text_array([sentence(2, 8) for _ in range(n)]),
        'tokens': _common.text_array([sentence(3, 30) for _ in range(n)]),
        'type': _common.text_array(
          ['question' if rng.random() < 0.5 else 'answer' for _ in range(n)]
        ),
      }
  word_count = ''.join(f'w{i} {100_000 - i}\n' for i in range(WORD_VOCAB_SIZE))
  tag_count = json.dumps({f't{i}': 10_000 - i for i in range(TAG_VOCAB_SIZE + 20)})
  files = {_stackoverflow.WORD_COUNT_FILE: word_count, _stackoverflow.TAG_COUNT_FILE: tag_count}
  return raw, files


def stackoverflow_word(
  vocab_size: int = WORD_VOCAB_SIZE, sequence_length: int = SEQUENCE_LENGTH
) -> _task.Task:
  """Next-word prediction on Stack Overflow posts, one client per user.

  `x`, `y` `[n, sequence_length]` int32 in TFF's ids (`fl.data.stackoverflow_word_tokens`: pad
  0, words 1..10000, OOV 10001, BOS 10002, EOS 10003; 10004 ids). Model: embedding 96, LSTM
  670, dense 96, dense 10004 (4,050,748 parameters); loss: cross-entropy over the positions
  whose *input* is not pad (TFF's `mask_zero` embedding: the EOS -> pad position counts; run by
  the model's forward pass, while `model.loss`, seeing no inputs, masks by label); TFF's metrics
  `num_tokens`, `accuracy` (pad masked), `accuracy_without_out_of_vocab` (pad, OOV) and
  `accuracy_without_out_of_vocab_or_end_of_sentence` (pad, OOV, EOS, and BOS, which labels
  never hold), all masking by label.
  """
  name = 'stackoverflow_word'
  tokens = _stackoverflow.stackoverflow_word_tokens(vocab_size)
  metrics = {
    'num_tokens': metrics_lib.num_tokens([tokens.pad]),
    'accuracy': metrics_lib.masked_token_accuracy([tokens.pad]),
    'accuracy_without_out_of_vocab': metrics_lib.masked_token_accuracy([tokens.pad, tokens.oov]),
    'accuracy_without_out_of_vocab_or_end_of_sentence': metrics_lib.masked_token_accuracy(
      [tokens.pad, tokens.oov, tokens.bos, tokens.eos]
    ),
  }
  input_spec = _common.spec((sequence_length,), _common.INT32, (sequence_length,), _common.INT32)
  loss_fn = _recurrent.masked_token_cross_entropy([tokens.pad])
  metrics_fns = _common.metric_fns(metrics)

  def build_model(seed: int):
    module = _recurrent.LSTMLanguageModel(
      tokens.vocab_size, embedding_size=96, lstm_sizes=(670,), projection_size=96
    )
    model = _flax.from_flax(module, input_spec=input_spec, loss_fn=loss_fn, seed=seed)
    trainable = _recurrent.unit_forget_bias(model.initial_weights.trainable)
    forward_pass = _common.input_masked_forward_pass(model, tokens.pad)
    return _common.rebuilt(model, trainable, loss_fn, metrics_fns, forward_pass)

  def hooks(vocab):
    train = _stackoverflow.stackoverflow_word_preprocess(
      vocab, sequence_length, MAX_ELEMENTS_PER_USER
    )
    return train, _stackoverflow.stackoverflow_word_preprocess(vocab, sequence_length, None)

  def prepare(populations, vocab_files, seed):
    del seed
    vocab = _words(vocab_files[_stackoverflow.WORD_COUNT_FILE], vocab_size, 'word_count')
    return _prepare(name, populations, *hooks(vocab))

  def read(found, seed):
    del seed
    return _prepare(name, _read_populations(found), *hooks(_read_words(found, vocab_size)))

  return _task.Task(
    name=name,
    description='Stack Overflow next-word prediction, one client per user, LSTM 670',
    sources={
      'vocabulary, special tokens, sequence length': (
        f'{_TFF_FILE}/word_prediction_preprocessing.py, constants.py'
      ),
      'model': f'{_TFF_FILE}/word_prediction_models.py',
      'loss, metrics': f'{_TFF_FILE}/word_prediction_tasks.py, keras_metrics.py',
      'loss mask (input pad)': _common.LOSS_MASK_SOURCE,
      'max elements per user (1000, training clients)': _reddi.PAPER_CODE,
      'data': _DATA,
      **_reddi.sources(name),
    },
    defaults=_reddi.defaults(name),
    tuned=_reddi.tuned(name),
    files=(*_h5_files(), _vocab_file(_stackoverflow.WORD_COUNT_FILE)),
    input_spec=input_spec,
    metric_names=_common.metric_names(metrics),
    num_outputs=tokens.vocab_size,
    special_tokens=tokens,
    build_model=build_model,
    read=read,
    generate=_generate,
    prepare=prepare,
  )


def sigmoid_cross_entropy_sum(logits, labels, sample_weight=None):
  """Keras's `BinaryCrossentropy(reduction=SUM)` as TFF's tag task trains: each example's
  binary cross-entropy averaged over its labels, summed over the batch's real examples."""
  per_example = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, labels), axis=-1)
  if sample_weight is not None:
    w = sample_weight.astype(per_example.dtype)
    per_example = jnp.where(w > 0, per_example, 0) * w
  return jnp.sum(per_example)


def stackoverflow_tag(
  word_vocab_size: int = WORD_VOCAB_SIZE, tag_vocab_size: int = TAG_VOCAB_SIZE
) -> _task.Task:
  """Tag prediction on Stack Overflow posts, one client per user, logistic regression.

  `x` `[n, 10000]` float32 (bag of words of the post and its title, normalized), `y` `[n, 500]`
  float32 multi-hot tags. Model: one dense layer (5,000,500 parameters), logits (TFF applies
  the sigmoid in the model; here the loss and metrics take logits); loss: binary cross-entropy
  summed over examples (TFF's `Reduction.SUM`); TFF's metrics `precision` (threshold 0.5) and
  `recall_at_5` (Keras's `Recall(top_k=5)`: a true tag among the example's 5 highest scores is
  recalled whatever its probability). A tag listed twice in a post is 2.0 in `y`, as TFF's
  `reduce_sum` of one-hots gives it (the loss sees 2.0; the metrics read > 0 as true).
  """
  name = 'stackoverflow_tag'
  metrics = {'precision': metrics_lib.precision(), 'recall_at_5': metrics_lib.recall_at_k(5)}
  input_spec = _common.spec((word_vocab_size,), _common.FLOAT32, (tag_vocab_size,), _common.FLOAT32)

  def build_model(seed: int):
    module = nn.Dense(tag_vocab_size, kernel_init=nn.initializers.glorot_uniform())
    return _flax.from_flax(
      module,
      input_spec=input_spec,
      loss_fn=sigmoid_cross_entropy_sum,
      metrics_fns=_common.metric_fns(metrics),
      seed=seed,
    )

  def hooks(words, tags):
    train = _stackoverflow.stackoverflow_tag_preprocess(words, tags, MAX_ELEMENTS_PER_USER)
    return train, _stackoverflow.stackoverflow_tag_preprocess(words, tags, None)

  def prepare(populations, vocab_files, seed):
    del seed
    words = _words(vocab_files[_stackoverflow.WORD_COUNT_FILE], word_vocab_size, 'word_count')
    counts = json.loads(vocab_files[_stackoverflow.TAG_COUNT_FILE])
    tags = [t for t, _ in sorted(counts.items(), key=lambda i: i[1], reverse=True)]
    return _prepare(name, populations, *hooks(words, tags[:tag_vocab_size]))

  def read(found, seed):
    del seed
    words = _read_words(found, word_vocab_size)
    tags = list(_stackoverflow.load_stackoverflow_tag_counts(found[_stackoverflow.TAG_COUNT_FILE]))
    return _prepare(name, _read_populations(found), *hooks(words, tags[:tag_vocab_size]))

  return _task.Task(
    name=name,
    description='Stack Overflow tag prediction (500 tags), one client per user, logistic model',
    sources={
      'vocabularies (10,000 words, 500 tags), bag of words': (
        f'{_TFF_FILE}/tag_prediction_preprocessing.py, constants.py'
      ),
      'model, loss, metrics': f'{_TFF_FILE}/tag_prediction_tasks.py',
      'recall_at_5 (top 5, no threshold)': 'tf.keras.metrics.Recall(top_k=5): top_k sets the '
      'threshold to -inf',
      'multi-hot tags (repeated tag 2.0)': f'{_TFF_FILE}/tag_prediction_preprocessing.py '
      '(reduce_sum of one-hots)',
      'max elements per user (1000, training clients)': _reddi.PAPER_CODE,
      'data': _DATA,
      **_reddi.sources(name),
    },
    defaults=_reddi.defaults(name),
    tuned=_reddi.tuned(name),
    files=(
      *_h5_files(),
      _vocab_file(_stackoverflow.WORD_COUNT_FILE),
      _vocab_file(_stackoverflow.TAG_COUNT_FILE),
    ),
    input_spec=input_spec,
    metric_names=_common.metric_names(metrics),
    num_outputs=tag_vocab_size,
    build_model=build_model,
    read=read,
    generate=_generate,
    prepare=prepare,
  )
