"""EMNIST character recognition (`tff.simulation.baselines.emnist`, char_recognition_tasks.py)."""

from __future__ import annotations

import numpy as np

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.data import _federated_data, _tff_h5
from fedjax_lite.models import _conv_dropout, _flax, _losses
from fedjax_lite.tasks import _common, _reddi, _task


def _to_batches(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
  """TFF's `_reshape_for_character_recognition`: pixels `[n, 28, 28]` -> x `[n, 28, 28, 1]`."""
  return {
    'x': np.asarray(dataset['pixels'], np.float32)[..., None],
    'y': np.asarray(dataset['label']).astype(np.int32),
  }


def emnist_character(only_digits: bool = False) -> _task.Task:
  """EMNIST-62 (or EMNIST-10 with `only_digits`) with TFF's CNN with dropout.

  Clients are writers; `x` `[n, 28, 28, 1]` float32 (1.0 is the background, as TFF's files
  hold it), `y` `[n]` int32. Model `fl.models.ConvDropoutCNN` (1,206,590 parameters, 1,199,882
  with `only_digits`), loss softmax cross-entropy, metric `sparse_categorical_accuracy`.

  Reddi et al. 2021 tuned EMNIST-62 only: `emnist_character_digits` takes the EMNIST-62
  defaults and `tuned` rows unchanged (no paper tuned them for the 10 digits).
  """
  name = 'emnist_character_digits' if only_digits else 'emnist_character'
  num_classes = 10 if only_digits else 62
  prefix = 'fed_emnist_digitsonly' if only_digits else 'fed_emnist'
  metrics = {'sparse_categorical_accuracy': metrics_lib.sparse_categorical_accuracy()}
  input_spec = _common.spec((28, 28, 1), _common.FLOAT32, (), _common.INT32)

  def build_model(seed: int):
    return _flax.from_flax(
      _conv_dropout.ConvDropoutCNN(num_classes),
      input_spec=input_spec,
      loss_fn=_losses.softmax_cross_entropy,
      metrics_fns=_common.metric_fns(metrics),
      seed=seed,
      training_arg='train',
    )

  def prepare(populations, vocab_files, seed):
    del vocab_files, seed
    _task.check_splits(populations, ('train', 'test'), name)
    return _task.TaskData(
      train=populations['train'].preprocess_client(_to_batches),
      test=populations['test'].preprocess_client(_to_batches),
    )

  def read(found, seed):
    populations = {s: _tff_h5.load_tff_h5(found[f'{prefix}_{s}.h5']) for s in ('train', 'test')}
    return prepare(populations, {}, seed)

  def generate(num_clients, seed):
    rng = np.random.default_rng([seed, 62])
    raw = {}
    for split, n_clients in (('train', num_clients), ('test', max(1, num_clients // 2))):
      raw[split] = {
        f'f{i:04d}_{split[:2]}': {
          'label': rng.integers(0, num_classes, n).astype(np.int32),
          'pixels': rng.random((n, 28, 28), dtype=np.float32),
        }
        for i, n in enumerate(_common.client_sizes(rng, n_clients, 2, 6))
      }
    return raw, {}

  tff_file = f'{_common.TFF_BASELINES}/emnist'
  return _task.Task(
    name=name,
    description=(
      f"EMNIST-{num_classes} character recognition, one client per writer, TFF's CNN with dropout"
    ),
    sources={
      'model': f'{tff_file}/emnist_models.py create_conv_dropout_model',
      'preprocessing, loss, metrics': f'{tff_file}/char_recognition_tasks.py',
      'data': f'TFF {prefix}_{{train,test}}.h5 (Caldas et al. 2018, LEAF; Cohen et al. 2017)',
      **_reddi.sources('emnist_character'),
      **(
        {
          'defaults, tuned (EMNIST-62 values)': (
            f'{_reddi.PAPER} tunes EMNIST-62 only; the digits task reuses its rows untuned'
          )
        }
        if only_digits
        else {}
      ),
    },
    defaults=_reddi.defaults('emnist_character'),
    tuned=_reddi.tuned('emnist_character'),
    files=tuple(
      _task.DataFile(f'{prefix}_{s}.h5', _common.ORIGIN.format(prefix)) for s in ('train', 'test')
    ),
    input_spec=input_spec,
    metric_names=_common.metric_names(metrics),
    num_outputs=num_classes,
    build_model=build_model,
    read=read,
    generate=generate,
    prepare=prepare,
  )
