"""Stack Overflow as TFF's baselines use it: vocabulary files, next-word ids and bags of words.

TFF published the word and tag frequencies beside the dataset: `stackoverflow.word_count` (one
`word count` line per word, most frequent first) and `stackoverflow.tag_count` (a JSON object
tag -> count). Its baselines (`tff.simulation.baselines.stackoverflow`) keep the 10,000 most
frequent words and the 500 most frequent tags. The per-client hooks here turn TFF's raw clients
(`tokens`, `title`, `tags`: object arrays of `bytes`) into model batches `{'x', 'y'}`.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import NamedTuple

import numpy as np

from fedjax_lite.data import _federated_data, _federated_datasets

WORD_COUNT_FILE = 'stackoverflow.word_count'
TAG_COUNT_FILE = 'stackoverflow.tag_count'
_ORIGIN = 'storage.googleapis.com/tff-datasets-public/{}.tar.bz2'


class SpecialTokens(NamedTuple):
  """Ids of a token vocabulary's special tokens and its size (TFF's baselines' layout).

  Attributes:
    pad: padding id (0 in TFF).
    oov: out-of-vocabulary id (TFF's single OOV bucket).
    bos: beginning of sequence.
    eos: end of sequence.
    vocab_size: number of ids, special ones included (the model's embedding and output size).
  """

  pad: int
  oov: int
  bos: int
  eos: int
  vocab_size: int


def stackoverflow_word_tokens(vocab_size: int = 10_000) -> SpecialTokens:
  """TFF's ids around a `vocab_size`-word vocabulary (word_prediction_preprocessing.py's
  `get_special_tokens` with one OOV bucket): pad 0, words 1..vocab_size, OOV vocab_size + 1,
  BOS vocab_size + 2, EOS vocab_size + 3; vocab_size + 4 ids in all."""
  if not isinstance(vocab_size, int) or vocab_size < 1:
    raise ValueError(f'vocab_size must be an int >= 1; got {vocab_size!r}')
  return SpecialTokens(0, vocab_size + 1, vocab_size + 2, vocab_size + 3, vocab_size + 4)


def find_vocab_file(path: str | pathlib.Path | None, name: str) -> pathlib.Path:
  """The vocabulary file `name` at `path` (the file or its folder), or in the default folders.

  Raises:
    FileNotFoundError: naming where it was looked for and where TFF published it.
  """
  if path is not None:
    path = pathlib.Path(path)
    candidates = [path] if path.is_file() else [path / name]
  else:
    candidates = [d / name for d in _federated_datasets.default_data_dirs()]
  for candidate in candidates:
    if candidate.is_file():
      return candidate
  raise FileNotFoundError(
    f'{name} is in none of {[str(c.parent) for c in candidates]}. Tip: pass the file or its '
    f'folder, or set {_federated_datasets.DATA_DIR_ENV}; TFF published it in {_ORIGIN.format(name)}'
  )


def load_stackoverflow_word_counts(
  path: str | pathlib.Path | None = None, vocab_size: int | None = None
) -> dict[str, int]:
  """Word -> count from `stackoverflow.word_count`, in the file's order (most frequent first);
  the first `vocab_size` words when given (TFF's `load_word_counts`)."""
  counts = {}
  with open(find_vocab_file(path, WORD_COUNT_FILE), encoding='utf-8') as f:
    for line_num, line in enumerate(f, 1):
      if not line.strip():
        continue
      parts = line.split()
      if len(parts) != 2 or not parts[1].isdigit():
        raise ValueError(
          f'{WORD_COUNT_FILE} line {line_num} is {line.rstrip()!r}; expected "word count"'
        )
      counts[parts[0]] = int(parts[1])
      if vocab_size is not None and len(counts) >= vocab_size:
        break
  return counts


def load_stackoverflow_tag_counts(path: str | pathlib.Path | None = None) -> dict[str, int]:
  """Tag -> count from `stackoverflow.tag_count` (JSON), most frequent first; ties keep the
  file's order (TFF's `load_tag_counts`)."""
  with open(find_vocab_file(path, TAG_COUNT_FILE), encoding='utf-8') as f:
    counts = json.load(f)
  if not isinstance(counts, dict):
    raise ValueError(f'{TAG_COUNT_FILE} holds a {type(counts).__name__}; expected a JSON object')
  return dict(sorted(counts.items(), key=lambda item: item[1], reverse=True))


def _text(value) -> str:
  return value.decode('utf-8') if isinstance(value, bytes) else str(value)


def _lookup(vocab: Sequence[str]) -> dict[str, int]:
  if not vocab:
    raise ValueError('vocab must be a non-empty sequence of words')
  return {w: i for i, w in enumerate(vocab)}


def _take(dataset: _federated_data.ClientDataset, max_elements: int | None):
  if max_elements is None:
    return dataset
  return {k: v[:max_elements] for k, v in dataset.items()}


def stackoverflow_word_preprocess(
  vocab: Sequence[str], sequence_length: int = 20, max_elements: int | None = 1000
) -> Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]:
  """A per-client hook `{'tokens': [n], ...} -> {'x': [n, L], 'y': [n, L]}` int32 (TFF's ids).

  As TFF's `build_to_ids_fn` with one OOV bucket: each post's space-separated words are cut to
  `L = sequence_length`, looked up (word `i` of `vocab` -> `i + 1`, others OOV), followed by EOS
  when fewer than `L`, preceded by BOS, padded with 0 to `L + 1`; `x` is the row without its last
  id, `y` without its first (`stackoverflow_word_tokens(len(vocab))` gives the ids).

  Args:
    vocab: the words, most frequent first (`load_stackoverflow_word_counts`).
    sequence_length: L.
    max_elements: keep a client's first `max_elements` posts (Reddi et al. 2021 cap each
      client at 1000); None keeps all. TFF shuffles before taking; this hook is deterministic.
  """
  if not isinstance(sequence_length, int) or sequence_length < 1:
    raise ValueError(f'sequence_length must be an int >= 1; got {sequence_length!r}')
  table = _lookup(vocab)
  tokens = stackoverflow_word_tokens(len(table))

  def preprocess(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
    if 'tokens' not in dataset:
      raise KeyError(
        f"stackoverflow_word_preprocess needs a 'tokens' feature; got {sorted(dataset)}"
      )
    posts = np.asarray(_take(dataset, max_elements)['tokens']).reshape(-1)
    rows = np.zeros((len(posts), sequence_length + 1), np.int32)
    for r, post in enumerate(posts):
      words = _text(post).split(' ')[:sequence_length]
      ids = [table.get(w, tokens.oov - 1) + 1 for w in words]
      if len(ids) < sequence_length:
        ids.append(tokens.eos)
      rows[r, : len(ids) + 1] = [tokens.bos, *ids]
    return {'x': rows[:, :-1], 'y': rows[:, 1:]}

  return preprocess


def stackoverflow_tag_preprocess(
  word_vocab: Sequence[str], tag_vocab: Sequence[str], max_elements: int | None = 1000
) -> Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]:
  """A per-client hook `{'tokens', 'title', 'tags': [n]} -> {'x': [n, W], 'y': [n, T]}` float32.

  As TFF's tag_prediction_preprocessing.py: `x` is the bag of the post's and its title's
  whitespace-separated words over the `W = len(word_vocab)` words, divided by the number of
  in-vocabulary words (all zeros when none); `y` counts each of the post's `|`-separated tags
  among the `T = len(tag_vocab)` tags (TFF's `reduce_sum` of one-hots: 1.0 per tag, 2.0 for a
  tag the post lists twice; the metrics read any count > 0 as a true tag, as Keras's do).

  Args:
    word_vocab: the words, most frequent first.
    tag_vocab: the tags, most frequent first (`load_stackoverflow_tag_counts`).
    max_elements: keep a client's first `max_elements` posts (Reddi et al. 2021: 1000); None
      keeps all.
  """
  words = _lookup(word_vocab)
  tags = _lookup(tag_vocab)

  def preprocess(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
    missing = {'tokens', 'title', 'tags'} - set(dataset)
    if missing:
      raise KeyError(
        f'stackoverflow_tag_preprocess needs the features tokens, title and tags; got '
        f'{sorted(dataset)}'
      )
    dataset = _take(dataset, max_elements)
    n = len(dataset['tokens'])
    x = np.zeros((n, len(words)), np.float32)
    y = np.zeros((n, len(tags)), np.float32)
    for r in range(n):
      sentence = f'{_text(dataset["tokens"][r])} {_text(dataset["title"][r])}'
      ids = [words[w] for w in sentence.split() if w in words]
      np.add.at(x[r], ids, 1.0)
      if ids:
        x[r] /= len(ids)
      # TFF sums the tags' one-hots: a tag listed twice in a post counts 2.0.
      np.add.at(y[r], [tags[t] for t in _text(dataset['tags'][r]).split('|') if t in tags], 1.0)
    return {'x': x, 'y': y}

  return preprocess
