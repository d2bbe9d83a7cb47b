"""Shakespeare next-character prediction (`tff.simulation.baselines.shakespeare`)."""

from __future__ import annotations

import numpy as np

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.data import _shakespeare, _tff_h5
from fedjax_lite.models import _flax, _recurrent
from fedjax_lite.tasks import _common, _reddi, _task

NAME = 'shakespeare_character'
SEQUENCE_LENGTH = 80  # char_prediction_preprocessing.py, from McMahan et al. 2017
TOKENS = _shakespeare.SHAKESPEARE_TFF_TOKENS
# Characters outside TFF's vocabulary, so stand-ins exercise the OOV id.
_OOV_CHARS = '~{}<>'


def shakespeare_character(sequence_length: int = SEQUENCE_LENGTH) -> _task.Task:
  """Next-character prediction on Shakespeare's plays, one client per speaking role.

  `x`, `y` `[n, sequence_length]` int32 in TFF's ids (`fl.data.SHAKESPEARE_TFF_TOKENS`: pad 0,
  characters 1..86, OOV 87, BOS 88, EOS 89; 90 ids). Model: embedding 8, two LSTM layers of
  256, dense 90 (`fl.models.LSTMLanguageModel`, 820,522 parameters); metrics `num_tokens` and
  `accuracy`, both without the positions whose label is pad (as TFF masks).

  Loss: cross-entropy averaged over the positions whose *input* is not pad, as TFF's Keras
  `Embedding(mask_zero=True)` masks them, so the one EOS -> pad position of a sequence counts
  (the metrics leave it out). Training and evaluation run it through the model's forward pass;
  `model.loss(logits, labels, mask)` sees no inputs and masks by label (that position out).
  """
  masked = [TOKENS.pad]
  metrics = {
    'num_tokens': metrics_lib.num_tokens(masked),
    'accuracy': metrics_lib.masked_token_accuracy(masked),
  }
  input_spec = _common.spec((sequence_length,), _common.INT32, (sequence_length,), _common.INT32)
  loss_fn = _recurrent.masked_token_cross_entropy(masked)
  metrics_fns = _common.metric_fns(metrics)

  def build_model(seed: int):
    module = _recurrent.LSTMLanguageModel(
      TOKENS.vocab_size, embedding_size=8, lstm_sizes=(256, 256), kernel_init='he_normal'
    )
    model = _flax.from_flax(module, input_spec=input_spec, loss_fn=loss_fn, seed=seed)
    trainable = _recurrent.unit_forget_bias(model.initial_weights.trainable)
    forward_pass = _common.input_masked_forward_pass(model, TOKENS.pad)
    return _common.rebuilt(model, trainable, loss_fn, metrics_fns, forward_pass)

  hook = _shakespeare.shakespeare_tff_preprocess(sequence_length)

  def prepare(populations, vocab_files, seed):
    del vocab_files, seed
    _task.check_splits(populations, ('train', 'test'), NAME)
    return _task.TaskData(
      train=populations['train'].preprocess_client(hook),
      test=populations['test'].preprocess_client(hook),
    )

  def read(found, seed):
    populations = {s: _tff_h5.load_tff_h5(found[f'shakespeare_{s}.h5']) for s in ('train', 'test')}
    return prepare(populations, {}, seed)

  def generate(num_clients, seed):
    rng = np.random.default_rng([seed, 86])
    alphabet = np.array(list(_shakespeare.SHAKESPEARE_CHARS + _OOV_CHARS))
    weights = np.r_[np.full(86, 1.0), np.full(len(_OOV_CHARS), 0.05)]
    raw = {}
    for split, n_clients in (('train', num_clients), ('test', max(1, num_clients // 2))):
      raw[split] = {}
      for i, n in enumerate(_common.client_sizes(rng, n_clients, 1, 3)):
        lengths = rng.integers(20, 200, n)
        snippets = [
          ''.join(rng.choice(alphabet, size=k, p=weights / weights.sum())) for k in lengths
        ]
        raw[split][f'PLAY_{i:02d}_{split.upper()}'] = {'snippets': _common.text_array(snippets)}
    return raw, {}

  tff_file = f'{_common.TFF_BASELINES}/shakespeare'
  return _task.Task(
    name=NAME,
    description='Shakespeare next-character prediction, one client per role, two-layer LSTM',
    sources={
      'vocabulary, special tokens, sequence length': f'{tff_file}/char_prediction_preprocessing.py',
      'model': f'{tff_file}/char_prediction_models.py (McMahan et al. 2017)',
      'loss, metrics (pad masked)': f'{tff_file}/char_prediction_tasks.py, keras_metrics.py',
      'loss mask (input pad)': _common.LOSS_MASK_SOURCE,
      'data': 'TFF shakespeare_{train,test}.h5 (Caldas et al. 2018, LEAF)',
      **_reddi.sources(NAME),
    },
    defaults=_reddi.defaults(NAME),
    tuned=_reddi.tuned(NAME),
    files=tuple(
      _task.DataFile(f'shakespeare_{s}.h5', _common.ORIGIN.format('shakespeare'))
      for s in ('train', 'test')
    ),
    input_spec=input_spec,
    metric_names=_common.metric_names(metrics),
    num_outputs=TOKENS.vocab_size,
    special_tokens=TOKENS,
    build_model=build_model,
    read=read,
    generate=generate,
    prepare=prepare,
  )
