"""TFF's baseline tasks: registry, TFF's vocabularies and ids, preprocessing and metrics against
numpy, real-file loaders on generated TFF-layout files, and two FedAvg rounds per task."""

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

import fedjax_lite as fl
from fedjax_lite import _catalogue, _config

h5py = pytest.importorskip('h5py')

TASK_NAMES = (
  'emnist_character',
  'shakespeare_character',
  'stackoverflow_word',
  'stackoverflow_tag',
  'cifar100',
)
# TFF's Shakespeare characters (char_prediction_preprocessing.py's CHAR_VOCAB), written out here.
TFF_CHAR_VOCAB = list(
  'dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'
)


@functools.cache
def _model(name):
  return fl.tasks.get_task(name).model(seed=0)


def rng_normal(shape, seed=0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=shape).astype(np.float32)


def _params(tree) -> int:
  return sum(int(np.size(leaf)) for leaf in jax.tree.leaves(tree))


def test_registry_names_defaults_and_sources():
  assert set(TASK_NAMES) <= set(fl.tasks.TASKS)
  assert fl.tasks.get_task('cifar100') is fl.tasks.TASKS['cifar100']
  with pytest.raises(ValueError, match=r"unknown task 'mnist'.*emnist_character"):
    fl.tasks.get_task('mnist')
  for task in fl.tasks.TASKS.values():
    assert set(task.defaults) == set(fl.tasks.DEFAULT_KEYS), task.name
    assert set(task.defaults) <= set(_config.option_names()), task.name  # the command's
    assert task.defaults['client_optimizer'] in _catalogue.OPTIMIZERS
    assert task.defaults['server_optimizer'] in _catalogue.OPTIMIZERS
    assert set(task.tuned) <= set(_catalogue.OPTIMIZERS)
    assert task.sources and all(task.sources.values())
    assert task.metric_names[:3] == ('loss', 'num_examples', 'num_batches')
  # Reddi et al. 2021: cross-task table and the FedAvgM / FedAdam rows (log10 values).
  so = fl.tasks.get_task('stackoverflow_word')
  assert (so.defaults['clients_per_round'], so.defaults['batch_size']) == (50, 16)
  assert so.defaults['rounds'] == 1500 and so.defaults['epochs'] == 1
  np.testing.assert_allclose(so.defaults['client_lr'], 10**-0.5)
  np.testing.assert_allclose(so.tuned['adam']['server_lr'], 10**-2)
  np.testing.assert_allclose(so.tuned['adam']['epsilon'], 1e-5)
  shakespeare = fl.tasks.get_task('shakespeare_character')
  assert shakespeare.defaults['batch_size'] == 4 and shakespeare.defaults['rounds'] == 1200
  settings = shakespeare.settings('sgd')  # FedAvg: log10 rates (0, 0)
  assert settings['server_optimizer'] == 'sgd' and settings['client_optimizer'] == 'sgd'
  np.testing.assert_allclose([settings['client_lr'], settings['server_lr']], [1.0, 1.0])
  assert shakespeare.settings() == dict(shakespeare.defaults)
  with pytest.raises(ValueError, match=r"server_optimizer must be one of.*got 'lamb'"):
    shakespeare.settings('lamb')
  # The adaptive rows need the paper's epsilon and initial accumulator, which the command's
  # optimizers cannot take: refused, kept in `tuned` as the record.
  for name in ('adam', 'adagrad', 'yogi'):
    assert 'epsilon' in shakespeare.tuned[name]
    with pytest.raises(
      ValueError, match=rf"server_optimizer '{name}' is adaptive.*epsilon.*initial accumulator"
    ):
      shakespeare.settings(name)


def test_special_tokens_match_tff():
  tokens = fl.data.SHAKESPEARE_TFF_TOKENS
  # get_special_tokens(): pad 0, oov len+1, bos len+2, eos len+3; VOCAB_LENGTH = len + 4.
  assert tuple(tokens) == (0, 87, 88, 89, 90)
  assert fl.tasks.get_task('shakespeare_character').special_tokens == tokens
  hook = fl.data.shakespeare_tff_preprocess(sequence_length=4)
  out = hook({'snippets': np.array([b'dx~', b'\r'], dtype=object)})
  d, x, cr = (TFF_CHAR_VOCAB.index(c) + 1 for c in 'dx\r')
  # Each snippet: [BOS, ids..., EOS] padded to a multiple of 5, rows of 5 split into x / y.
  rows = np.array([[88, d, x, 87, 89], [88, cr, 89, 0, 0]])
  np.testing.assert_array_equal(out['x'], rows[:, :-1])
  np.testing.assert_array_equal(out['y'], rows[:, 1:])
  assert (d, x, cr) == (1, 6, 86)
  # FedJAX's layout (the existing function) is unchanged: BOS 1, EOS 2, chars from 3.
  old = fl.data.shakespeare_preprocess(3)({'snippets': np.array([b'd'], dtype=object)})
  np.testing.assert_array_equal(old['x'], [[1, 3, 0]])
  so = fl.data.stackoverflow_word_tokens(10_000)
  assert tuple(so) == (0, 10_001, 10_002, 10_003, 10_004)
  assert fl.tasks.get_task('stackoverflow_word').special_tokens == so


def test_stackoverflow_word_preprocess_matches_tff_ids():
  vocab = ['a', 'b', 'c']  # ids 1, 2, 3; OOV 4, BOS 5, EOS 6
  hook = fl.data.stackoverflow_word_preprocess(vocab, sequence_length=4, max_elements=2)
  out = hook({'tokens': np.array([b'a zz c', b'c b a b a', b'dropped'], dtype=object)})
  # Shorter than 4: BOS ids EOS, padded; 4 or more: cut to 4, no EOS.
  rows = np.array([[5, 1, 4, 3, 6], [5, 3, 2, 1, 2]])
  np.testing.assert_array_equal(out['x'], rows[:, :-1])
  np.testing.assert_array_equal(out['y'], rows[:, 1:])


def test_stackoverflow_tag_preprocess_bag_of_words():
  hook = fl.data.stackoverflow_tag_preprocess(['a', 'b', 'c'], ['python', 'java'], None)
  out = hook(
    {
      'tokens': np.array([b'a b a zz', b'zz'], dtype=object),
      'title': np.array([b'c', b''], dtype=object),
      'tags': np.array([b'java|rust', b'python|java|python'], dtype=object),
    }
  )
  # In-vocabulary words only, divided by their number (OOV counts in neither).
  np.testing.assert_allclose(out['x'], [[0.5, 0.25, 0.25], [0, 0, 0]])
  # TFF sums the tags' one-hots: a tag listed twice counts 2.0.
  np.testing.assert_array_equal(out['y'], [[0, 1], [2, 1]])


def test_vocab_files_read_in_tff_order(tmp_path):
  (tmp_path / 'stackoverflow.word_count').write_text('the 9\nto 7\na 7\nof 1\n')
  (tmp_path / 'stackoverflow.tag_count').write_text(json.dumps({'c': 1, 'a': 5, 'b': 5}))
  assert list(fl.data.load_stackoverflow_word_counts(tmp_path, vocab_size=3)) == [
    'the',
    'to',
    'a',
  ]
  assert list(fl.data.load_stackoverflow_tag_counts(tmp_path)) == ['a', 'b', 'c']
  with pytest.raises(FileNotFoundError, match=r'stackoverflow\.word_count.*tff-datasets-public'):
    fl.data.load_stackoverflow_word_counts(tmp_path / 'nowhere')


def _numpy_masked_accuracy(logits, labels, weights, masked):
  correct = total = 0.0
  for b in range(labels.shape[0]):
    for t in range(labels.shape[1]):
      if weights[b] > 0 and labels[b, t] not in masked:
        total += 1
        correct += float(np.argmax(logits[b, t]) == labels[b, t])
  return correct / total, total


def _numpy_cross_entropy(logits, labels):
  """`[batch, L]` softmax cross-entropy, in float64."""
  logits = logits.astype(np.float64)
  top = logits.max(-1, keepdims=True)
  log_p = logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))
  return -np.take_along_axis(log_p, labels[..., None], -1)[..., 0]


@pytest.mark.parametrize('name', ['shakespeare_character', 'stackoverflow_word'])
def test_next_token_metrics_and_loss_mask_what_tff_masks(name):
  task = fl.tasks.get_task(name)
  model = _model(name)
  tokens = task.special_tokens
  rng = np.random.default_rng(1)
  labels = rng.integers(0, tokens.vocab_size, (5, 6)).astype(np.int32)
  labels[:, -2:] = tokens.pad
  labels[0, :3] = [tokens.oov, tokens.eos, tokens.oov]
  logits = rng.normal(size=(5, 6, tokens.vocab_size)).astype(np.float32)
  logits[0, 0, tokens.oov] = logits[0, 1, tokens.eos] = 50.0  # right on OOV and EOS
  logits[1, 0, labels[1, 0]] = 50.0
  mask = np.array([1, 1, 1, 1, 0], np.float32)

  @jax.jit
  def metrics_and_loss(logits, labels, mask):
    output = fl.BatchOutput(logits, jnp.zeros(()), jnp.asarray(4))
    state = model.update_metrics_state(model.initialize_metrics_state(), labels, output, mask)
    return model.finalize_metrics(state), model.loss(logits, labels, mask)

  result, loss = metrics_and_loss(logits, labels, mask)
  # TFF masks pad only in `accuracy` and `num_tokens` (both tasks).
  expected, count = _numpy_masked_accuracy(logits, labels, mask, {tokens.pad})
  np.testing.assert_allclose(float(result['accuracy']), expected, rtol=1e-6)
  assert int(result['num_tokens']) == count
  if name == 'stackoverflow_word':
    for metric, masked in [
      ('accuracy_without_out_of_vocab', {tokens.pad, tokens.oov}),
      (
        'accuracy_without_out_of_vocab_or_end_of_sentence',
        {tokens.pad, tokens.oov, tokens.bos, tokens.eos},
      ),
    ]:
      expected, _ = _numpy_masked_accuracy(logits, labels, mask, masked)
      np.testing.assert_allclose(float(result[metric]), expected, rtol=1e-6)
  # `model.loss` sees no inputs: mean cross-entropy over non-pad labels of real examples.
  real = (labels != tokens.pad) & (mask[:, None] > 0)
  np.testing.assert_allclose(float(loss), _numpy_cross_entropy(logits, labels)[real].mean(), 1e-5)

  # Training and evaluation run TFF's loss: Keras's mask_zero masks by *input*, so the position
  # whose input is EOS and whose label is pad counts. Rows as the preprocessing makes them.
  ids = rng.integers(1, tokens.oov, (3, 4))
  rows = np.zeros((3, 7), np.int32)
  rows[0, :4] = [tokens.bos, *ids[0, :2], tokens.eos]  # short: BOS ids EOS, pad
  rows[1, :7] = [tokens.bos, *ids[1], tokens.oov, tokens.eos]  # reaches EOS at the end
  rows[2, :3] = [tokens.bos, ids[2, 0], tokens.eos]  # a padded example
  x, y = rows[:, :-1], rows[:, 1:]
  batch_mask = np.array([1, 1, 0], np.float32)
  assert model.uses_forward_pass
  # Weights scaled up so the positions' losses differ (the initial logits are near uniform).
  weights = jax.tree.map(lambda a: a * 8, model.initial_weights)
  out = jax.jit(lambda w, b, m: model.forward_pass(w, b, False, mask=m))(
    weights, {'x': jnp.asarray(x), 'y': jnp.asarray(y)}, jnp.asarray(batch_mask)
  )
  predictions = np.asarray(out.predictions)
  per_token = _numpy_cross_entropy(predictions, y)
  by_input = (x != tokens.pad) & (batch_mask[:, None] > 0)
  by_label = (y != tokens.pad) & (batch_mask[:, None] > 0)
  assert by_input.sum() == by_label.sum() + 1  # row 0's EOS -> pad position
  np.testing.assert_allclose(float(out.loss), per_token[by_input].mean(), rtol=1e-5)
  assert not np.isclose(float(out.loss), per_token[by_label].mean(), rtol=1e-3)
  assert int(out.num_examples) == 2


def _keras_recall_at_k(scores, labels, k):
  """Keras's `Recall(top_k=k)`: `top_k` sets the threshold to -inf, so a true label is recalled
  when it is among its example's k highest scores (ties: lower index first, as tf.math.top_k),
  whatever its probability; tp / (tp + fn) summed over every example."""
  hits = actual = 0
  for row, truth in zip(scores, labels > 0, strict=True):
    top = np.argsort(-row, kind='stable')[:k]
    hits += truth[top].sum()
    actual += truth.sum()
  return hits / actual


def test_precision_and_recall_at_5_against_numpy():
  rng = np.random.default_rng(2)
  labels = (rng.random((6, 12)) < 0.3).astype(np.float32)
  labels[0, :2] = 2.0  # a tag listed twice (TFF's multi-hot sums): still one true tag
  mask = np.array([1, 1, 1, 1, 1, 0], np.float32)
  precision, recall = fl.metrics.precision(), fl.metrics.recall_at_k(5)

  @jax.jit
  def compute(logits):
    output = fl.BatchOutput(logits, jnp.zeros(()), jnp.asarray(5))
    return [
      m.finalize(m.update(m.initialize(), jnp.asarray(labels), output, jnp.asarray(mask)))
      for m in (precision, recall)
    ]

  for shift in (0.0, -10.0):  # -10: every probability below 0.5
    logits = rng.normal(size=(6, 12)).astype(np.float32) * 2 + shift
    got_precision, got_recall = (float(v) for v in compute(logits))
    probs = 1 / (1 + np.exp(-logits[:5].astype(np.float64)))
    actual = labels[:5] > 0
    positive = probs > 0.5  # Keras's Precision(): threshold 0.5 over every (example, tag)
    want = (positive & actual).sum() / max(positive.sum(), 1)
    np.testing.assert_allclose(got_precision, want, 1e-6)
    want = _keras_recall_at_k(probs, labels[:5], 5)
    np.testing.assert_allclose(got_recall, want, 1e-6)
    assert want > 0
  assert (probs < 0.5).all()  # the old "top 5 and above 0.5" would have recalled nothing
  # threshold=t also asks for the score above t (Keras's Recall(thresholds=t, top_k=k)).
  with_threshold = fl.metrics.recall_at_k(5, threshold=0.5)
  state = with_threshold.update(
    with_threshold.initialize(), jnp.asarray(labels), fl.BatchOutput(jnp.asarray(logits), 0, 5)
  )
  assert float(with_threshold.finalize(state)) == 0.0
  with pytest.raises(ValueError, match=r'threshold must be in \(0, 1\); got 1.5'):
    fl.metrics.recall_at_k(5, threshold=1.5)
  task = fl.tasks.get_task('stackoverflow_tag')
  assert {'precision', 'recall_at_5'} <= set(task.metric_names)


def test_cifar100_preprocess_crops_and_standardizes():
  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, (3, 32, 32, 3)).astype(np.uint8)
  data = {'image': images, 'label': np.array([1, 2, 3], np.int64)}
  central = fl.data.cifar100_preprocess()(data)
  crop = images[:, 4:28, 4:28].astype(np.float64)
  flat = crop.reshape(3, -1)
  expected = (flat - flat.mean(1, keepdims=True)) / flat.std(1, keepdims=True)
  np.testing.assert_allclose(central['x'].reshape(3, -1), expected, atol=1e-5)
  assert central['x'].shape == (3, 24, 24, 3) and central['y'].dtype == np.int32
  distorted = fl.data.cifar100_preprocess(distort=True, seed=0)(data)
  assert distorted['x'].shape == (3, 24, 24, 3)
  # Each distorted image is a standardized 24x24 window of the original, maybe flipped.
  for img, out in zip(images.astype(np.float64), distorted['x'], strict=True):
    found = False
    for top in range(9):
      for left in range(9):
        w = img[top : top + 24, left : left + 24]
        for cand in (w, w[:, ::-1]):
          c = (cand - cand.mean()) / cand.std()
          found |= np.allclose(c, out, atol=1e-4)
    assert found


def _tff_resnet18_params(channels=3, classes=100):
  """Parameters of TFF's create_resnet18 (group norm), counted from its layer list."""
  conv = lambda k, cin, cout: k * k * cin * cout
  gn = lambda c: 2 * c
  total, cin = conv(7, channels, 64) + gn(64), 64
  for stage, filters in enumerate((64, 128, 256, 512)):
    for block in range(2):
      if not (stage == 0 and block == 0):
        total += gn(cin)  # normalize_first
      total += conv(3, cin, filters) + gn(filters) + conv(3, filters, filters)
      if cin != filters:
        total += conv(1, cin, filters) + gn(filters)  # projection shortcut
      cin = filters
  return total + gn(512) + 512 * classes + classes


def test_model_sizes_match_tff():
  assert _params(_model('emnist_character').initial_weights.trainable) == 1_206_590
  digits = fl.tasks.get_task('emnist_character_digits').model(0)
  assert _params(digits.initial_weights.trainable) == 1_199_882  # TFF's model summary
  # embedding 90x8, LSTM 4(8*256+256*256+256), LSTM 4(2*256*256+256), dense 256*90+90.
  assert _params(_model('shakespeare_character').initial_weights.trainable) == 820_522
  # Reddi et al. 2021, Table 2: 4,050,748 parameters.
  assert _params(_model('stackoverflow_word').initial_weights.trainable) == 4_050_748
  assert _params(_model('stackoverflow_tag').initial_weights.trainable) == 10_000 * 500 + 500
  cifar = _model('cifar100')
  assert _params(cifar.initial_weights.trainable) == _tff_resnet18_params() == 11_227_812
  assert cifar.initial_weights.non_trainable == {}
  # Keras's unit_forget_bias: the LSTMs' forget-gate biases start at 1.
  lstm = _model('shakespeare_character').initial_weights.trainable['OptimizedLSTMCell_0']
  np.testing.assert_array_equal(lstm['hf']['bias'], 1.0)
  np.testing.assert_array_equal(lstm['hi']['bias'], 0.0)


def test_cifar100_resnet_has_reddis_group_norm_and_tffs_feature_maps():
  task = fl.tasks.get_task('cifar100')
  assert 'groups=2' in task.sources['group norm, 2 groups (num_groups)']
  model = _model('cifar100')
  # Read the GN groups and the layers' input shapes off the task's own model, tracing only.
  groups, conv_inputs, norm_inputs = set(), [], []

  def record(next_fun, args, kwargs, context):
    if context.method_name == '__call__' and isinstance(context.module, nn.GroupNorm):
      groups.add(context.module.num_groups)
      norm_inputs.append(args[0].shape)
    if context.method_name == '__call__' and isinstance(context.module, nn.Conv):
      conv_inputs.append(args[0].shape)
    return next_fun(*args, **kwargs)

  x = jax.ShapeDtypeStruct((3, 24, 24, 3), jnp.float32)
  with nn.intercept_methods(record):
    out = jax.eval_shape(lambda w, x: model.predict_on_batch(w, x, False), model.initial_weights, x)
  assert out.shape == (3, 100)
  assert groups == {2}  # Reddi et al. 2021 (tfa's default), not Keras's 32
  # TFF's ResNet-18: the 7x7/2 conv and the 3x3/2 max-pool take 24x24 to 6x6, and every block
  # has stride 1, so the first block sees [n, 6, 6, 64] and the last GN [n, 6, 6, 512].
  assert conv_inputs[0] == (3, 24, 24, 3) and conv_inputs[1] == (3, 6, 6, 64)
  assert norm_inputs[-1] == (3, 6, 6, 512)
  assert all(shape[1:3] == (6, 6) for shape in conv_inputs[1:])
  # The group count reaches the output (same weights, 2 vs 4 groups, a small ResNetGN; jitted,
  # as eager convolutions compile one by one).
  small = {g: fl.models.ResNetGN(5, (1,), 8, num_groups=g) for g in (2, 4)}
  images = jnp.asarray(rng_normal((2, 8, 8, 3)))
  shapes = jax.eval_shape(small[2].init, jax.random.PRNGKey(1), images)
  params = jax.tree.map(lambda s: jnp.asarray(rng_normal(s.shape)), shapes)
  a, b = jax.jit(lambda p, x: [small[g].apply(p, x) for g in (2, 4)])(params, images)
  assert not np.allclose(a, b, atol=1e-3)
  with pytest.raises(ValueError, match=r'num_groups must be an int >= 1 dividing 64.*got 3'):
    fl.tasks.cifar100(num_groups=3)


def test_dropout_uses_the_rng_and_padding_is_invisible():
  model = _model('emnist_character')
  assert model.uses_rng
  x = jnp.asarray(np.random.default_rng(4).random((2, 28, 28, 1), np.float32))
  w = model.initial_weights
  predict = jax.jit(model.predict_on_batch, static_argnums=2)
  a = predict(w, x, True, jax.random.PRNGKey(0))
  b = predict(w, x, True, jax.random.PRNGKey(1))
  assert not np.allclose(a, b)
  e1 = predict(w, x, False, jax.random.PRNGKey(0))
  e2 = predict(w, x, False, jax.random.PRNGKey(1))
  np.testing.assert_array_equal(e1, e2)
  # (ResNet-18's group norm has no batch statistics either; its eager check costs ~8 s here, and
  # the two training rounds below run its masked forward pass.)
  for name in ('emnist_character', 'stackoverflow_tag'):
    fl.models.check_padding_invariance(_model(name))


@pytest.mark.parametrize('name', TASK_NAMES)
def test_task_trains_two_rounds_on_stand_in(name):
  task = fl.tasks.get_task(name)
  data = task.stand_in(num_clients=2, seed=0)
  model = _model(name)
  process = fl.algorithms.build_weighted_fed_avg(
    model, fl.optimizers.build_sgdm(0.01), fl.optimizers.build_sgdm(1.0)
  )
  state = process.initialize()
  ids = list(data.train.client_ids)
  first = None
  for round_num in range(2):
    # The smallest rounds that train: 2 clients, 1 step of 2 examples (one compile per task).
    batches = fl.data.batch_cohort(data.train, ids, batch_size=2, max_steps=1, round_num=round_num)
    state, metrics = process.next(state, batches)
    train = metrics['client_work']['train']
    assert set(task.metric_names) <= set(train), sorted(train)
    assert np.isfinite(float(train['loss']))
    assert int(train['num_examples']) > 0
    first = first or jax.tree.map(np.asarray, process.get_model_weights(state).trainable)
  last = process.get_model_weights(state).trainable
  assert any(
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(first), jax.tree.leaves(last), strict=True)
  )
  # Held-out data has the model's batch form too.
  example = data.test.get_client(data.test.client_ids[0])
  assert set(example) == {'x', 'y'}
  assert example['x'].shape[1:] == task.input_spec['x'].shape[1:]
  assert example['x'].dtype == task.input_spec['x'].dtype


@pytest.mark.parametrize('name', TASK_NAMES)
def test_loader_reads_tff_files(name, tmp_path, monkeypatch):
  task = fl.tasks.get_task(name)
  assert not task.available(tmp_path)
  missing = task.missing(tmp_path)
  assert missing and all(
    str(tmp_path) in line and 'tff-datasets-public' in line for line in missing
  )
  with pytest.raises(FileNotFoundError, match=f'task {name!r} cannot load'):
    task.load(tmp_path)
  written = task.write_stand_in(tmp_path, num_clients=2, seed=5)
  assert {p.name for p in written} == {f.name for f in task.files}
  assert task.available(tmp_path) and task.missing(tmp_path) == []
  monkeypatch.setenv('FEDJAX_LITE_DATA_DIR', str(tmp_path))
  loaded = task.load(seed=5)  # from $FEDJAX_LITE_DATA_DIR
  expected = task.stand_in(num_clients=2, seed=5)
  assert isinstance(loaded.train, fl.data.HDF5FederatedData)
  for split in ('train', 'test', 'validation'):
    want, got = getattr(expected, split), getattr(loaded, split)
    assert (want is None) == (got is None), split
    if want is None:
      continue
    assert sorted(got.client_ids) == sorted(want.client_ids)
    for client_id in want.client_ids:  # same order: random crops draw alike
      a, b = want.get_client(client_id), got.get_client(client_id)
      assert set(a) == set(b) == {'x', 'y'}
      for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])
