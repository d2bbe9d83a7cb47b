"""CIFAR-100 image classification (`tff.simulation.baselines.cifar100`)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from fedjax_lite import metrics as metrics_lib
from fedjax_lite.data import _cifar100
from fedjax_lite.models import _flax, _losses, _model, _resnet
from fedjax_lite.tasks import _common, _reddi, _task

NAME = 'cifar100'
CROP = (24, 24)  # image_classification_tasks.py DEFAULT_CROP_{HEIGHT,WIDTH}; Reddi et al. 2021
NUM_CLASSES = 100
# Reddi et al. 2021 trained with tfa's `GroupNormalization` default, 2 groups (TFF's group_norm.py
# also defaulted to 2 until 2023, when TFF moved to Keras's `GroupNormalization`, 32 groups).
REDDI_GN_GROUPS = 2


def cifar100(
  crop: tuple[int, int] = CROP,
  distort_train_images: bool = True,
  num_groups: int = REDDI_GN_GROUPS,
) -> _task.Task:
  """CIFAR-100 over TFF's 500 train / 100 test clients (Pachinko allocation), ResNet-18 with
  group normalization.

  `x` `[n, 24, 24, 3]` float32 (random crops flipped at random for training when
  `distort_train_images`, central crops for evaluation, each image standardized), `y` `[n]`
  int32. Model `fl.models.ResNetGN` as TFF's `create_resnet18`, with `num_groups` GN groups:
  2 by default, as Reddi et al. 2021 trained (tfa's `GroupNormalization` default; TFF's own
  group_norm.py also defaulted to 2 until a 2023 change moved TFF's ResNet to Keras's
  `GroupNormalization`, 32 groups: pass `num_groups=32` for today's TFF); loss: softmax
  cross-entropy plus TFF's L2 penalty 1e-4 on the kernels and the classifier's bias (Keras adds
  the layers' regularization losses to the loss); metric `sparse_categorical_accuracy`.

  TFF's task distorts training images only when asked (`distort_train_images=False` is its
  default); Reddi et al. 2021 train on random crops and flips, the default here.
  """
  if (
    not isinstance(num_groups, int)
    or isinstance(num_groups, bool)
    or num_groups < 1
    or (64 % num_groups)
  ):
    raise ValueError(
      f'num_groups must be an int >= 1 dividing 64 (every width of ResNet-18 is a multiple of '
      f'64); got {num_groups!r}'
    )
  metrics = {'sparse_categorical_accuracy': metrics_lib.sparse_categorical_accuracy()}
  input_spec = _common.spec((*crop, 3), _common.FLOAT32, (), _common.INT32)
  metrics_fns = _common.metric_fns(metrics)

  def build_model(seed: int):
    model = _flax.from_flax(
      _resnet.ResNetGN(NUM_CLASSES, num_groups=num_groups),
      input_spec=input_spec,
      loss_fn=_losses.softmax_cross_entropy,
      seed=seed,
    )

    def forward_pass(weights, batch, training=True, mask=None):
      x, y = _model.split_batch(batch)
      predictions = model.predict_on_batch(weights, x, training)
      mask = jnp.ones((y.shape[0],), jnp.float32) if mask is None else mask
      loss = _losses.softmax_cross_entropy(predictions, y, mask)
      loss = loss + _resnet.l2_regularization(weights.trainable)
      num_examples = jnp.sum(mask > 0).astype(jnp.int32)
      return _model.BatchOutput(predictions, loss, num_examples)

    return _common.rebuilt(
      model,
      model.initial_weights.trainable,
      _losses.softmax_cross_entropy,
      metrics_fns,
      forward_pass_fn=forward_pass,
    )

  def prepare(populations, vocab_files, seed):
    del vocab_files
    _task.check_splits(populations, ('train', 'test'), NAME)
    train_hook = _cifar100.cifar100_preprocess(crop, distort=distort_train_images, seed=seed)
    return _task.TaskData(
      train=populations['train'].preprocess_client(train_hook),
      test=populations['test'].preprocess_client(_cifar100.cifar100_preprocess(crop)),
    )

  def read(found, seed):
    populations = {
      s: _cifar100.load_cifar100(found[_cifar100.cifar100_file_name(s)], s)
      for s in _cifar100.CIFAR100_SPLITS
    }
    return prepare(populations, {}, seed)

  def generate(num_clients, seed):
    rng = np.random.default_rng([seed, 100])
    raw = {}
    for split, n_clients in (('train', num_clients), ('test', max(1, num_clients // 2))):
      raw[split] = {}
      for i, n in enumerate(_common.client_sizes(rng, n_clients, 2, 5)):
        label = rng.integers(0, NUM_CLASSES, n).astype(np.int64)
        raw[split][str(i)] = {
          'coarse_label': label // 5,
          'image': rng.integers(0, 256, (n, 32, 32, 3)).astype(np.uint8),
          'label': label,
        }
    return raw, {}

  tff_file = f'{_common.TFF_BASELINES}/cifar100'
  return _task.Task(
    name=NAME,
    description='CIFAR-100 over 500 clients (Pachinko allocation), ResNet-18 with group norm',
    sources={
      'crop 24x24, preprocessing': (
        f'{tff_file}/image_classification_preprocessing.py, image_classification_tasks.py'
      ),
      'random crop and flip for training': f'{_reddi.PAPER}, CIFAR-100 setup',
      'model, L2 1e-4': 'tensorflow_federated/python/simulation/models/resnet_models.py',
      'group norm, 2 groups (num_groups)': (
        f"{_reddi.PAPER_CODE}: tfa GroupNormalization default groups=2; TFF's "
        "simulation/models/group_norm.py defaulted to 2 until 2023, when TFF moved to Keras's "
        'GroupNormalization (32 groups)'
      ),
      'loss, metrics': f'{tff_file}/image_classification_tasks.py',
      'data': 'TFF fed_cifar100_{train,test}.h5 (Reddi et al. 2021; Krizhevsky 2009)',
      **_reddi.sources(NAME),
    },
    defaults=_reddi.defaults(NAME),
    tuned=_reddi.tuned(NAME),
    files=tuple(
      _task.DataFile(_cifar100.cifar100_file_name(s), _common.ORIGIN.format('fed_cifar100'))
      for s in _cifar100.CIFAR100_SPLITS
    ),
    input_spec=input_spec,
    metric_names=_common.metric_names(metrics),
    num_outputs=NUM_CLASSES,
    build_model=build_model,
    read=read,
    generate=generate,
    prepare=prepare,
  )
