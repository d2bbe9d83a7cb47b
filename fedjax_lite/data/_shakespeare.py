"""Shakespeare next-character prediction: snippets -> fixed-length sequences of character ids.

The 86-character vocabulary is the one of TFF's text-generation tutorial (also used by FedJAX);
ids 0, 1, 2 are reserved for padding, begin- and end-of-snippet, the characters take 3..88 and
every other byte is out-of-vocabulary (89), so `SHAKESPEARE_VOCAB_SIZE` is 90 (TFF's
`VOCAB_LENGTH`).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from fedjax_lite.data import _federated_data, _stackoverflow

SHAKESPEARE_CHARS = (
  'dhlptx@DHLPTX $(,048cgkoswCGKOSW[_#\'/37;?bfjnrvzBFJNRVZ"&*.26:\naeimquyAEIMQUY]!%)-159\r'
)
PAD, BOS, EOS = 0, 1, 2
_NUM_RESERVED = 3
OOV = _NUM_RESERVED + len(SHAKESPEARE_CHARS)
SHAKESPEARE_VOCAB_SIZE = OOV + 1

# byte value -> id
_TABLE = np.full(256, OOV, dtype=np.int32)
_TABLE[np.frombuffer(SHAKESPEARE_CHARS.encode('ascii'), dtype=np.uint8)] = np.arange(
  _NUM_RESERVED, OOV, dtype=np.int32
)


def _snippet_ids(snippet: bytes | str) -> np.ndarray:
  if isinstance(snippet, str):
    snippet = snippet.encode('utf-8')
  return np.concatenate([[BOS], _TABLE[np.frombuffer(snippet, dtype=np.uint8)], [EOS]])


def shakespeare_preprocess(
  sequence_length: int = 80,
) -> Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]:
  """A per-client hook `{'snippets': [n]} -> {'x': [m, L], 'y': [m, L]}` int32, L = sequence_length.

  A client's snippets are each wrapped in BOS ... EOS and joined into one stream of ids; `x` is
  the stream without its last id and `y` the stream without its first (the next character),
  both cut into rows of `sequence_length` and padded with PAD (0) at the end. With
  `sequence_length=3`, `[b'ab', b'c']` gives `x = [[BOS, a, b], [EOS, BOS, c]]`,
  `y = [[a, b, EOS], [BOS, c, EOS]]`. Unlike TFF's tutorial, no character is dropped.

  Example:
    >>> train = fl.data.load_shakespeare(path).preprocess_client(fl.data.shakespeare_preprocess())
  """
  if not isinstance(sequence_length, int) or sequence_length < 1:
    raise ValueError(f'sequence_length must be an int >= 1; got {sequence_length!r}')

  def preprocess(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
    if 'snippets' not in dataset:
      raise KeyError(f"shakespeare_preprocess needs a 'snippets' feature; got {sorted(dataset)}")
    snippets = np.asarray(dataset['snippets']).reshape(-1)
    stream = np.concatenate([_snippet_ids(s) for s in snippets] or [np.zeros(0, np.int32)])
    rows = -(-max(len(stream) - 1, 0) // sequence_length)
    x = np.full(rows * sequence_length, PAD, dtype=np.int32)
    y = np.full(rows * sequence_length, PAD, dtype=np.int32)
    x[: len(stream) - 1] = stream[:-1]
    y[: len(stream) - 1] = stream[1:]
    return {'x': x.reshape(rows, sequence_length), 'y': y.reshape(rows, sequence_length)}

  return preprocess


# TFF's layout (`tff.simulation.baselines.shakespeare`, char_prediction_preprocessing.py): pad 0,
# the characters at 1..86 (their index in SHAKESPEARE_CHARS plus one), then one OOV bucket (87),
# BOS (88) and EOS (89); 90 ids in all (char_prediction_tasks.py's VOCAB_LENGTH).
TFF_PAD = 0
TFF_OOV = len(SHAKESPEARE_CHARS) + 1
TFF_BOS = len(SHAKESPEARE_CHARS) + 2
TFF_EOS = len(SHAKESPEARE_CHARS) + 3
TFF_SHAKESPEARE_VOCAB_SIZE = len(SHAKESPEARE_CHARS) + 4

SHAKESPEARE_TFF_TOKENS = _stackoverflow.SpecialTokens(
  pad=TFF_PAD, oov=TFF_OOV, bos=TFF_BOS, eos=TFF_EOS, vocab_size=TFF_SHAKESPEARE_VOCAB_SIZE
)

_TFF_TABLE = np.full(256, TFF_OOV, dtype=np.int32)
_TFF_TABLE[np.frombuffer(SHAKESPEARE_CHARS.encode('ascii'), dtype=np.uint8)] = np.arange(
  1, TFF_OOV, dtype=np.int32
)


def shakespeare_tff_preprocess(
  sequence_length: int = 80,
) -> Callable[[_federated_data.ClientDataset], _federated_data.ClientDataset]:
  """A per-client hook `{'snippets': [n]} -> {'x': [m, L], 'y': [m, L]}` int32 in TFF's ids.

  As TFF's baselines do: each snippet becomes `[TFF_BOS, chars..., TFF_EOS]` (characters at
  1..86, anything else `TFF_OOV`), padded with `TFF_PAD` (0) to a multiple of `L + 1`, and cut
  into rows of `L + 1`; `x` is a row without its last id, `y` without its first. Rows never span
  two snippets. With `sequence_length=3`, `[b'ab']` gives `x = [[88, a, b]]`,
  `y = [[a, b, 89]]` where `a`, `b` are the characters' ids.
  """
  if not isinstance(sequence_length, int) or sequence_length < 1:
    raise ValueError(f'sequence_length must be an int >= 1; got {sequence_length!r}')
  row = sequence_length + 1

  def tokens(snippet: bytes | str) -> np.ndarray:
    if isinstance(snippet, str):
      snippet = snippet.encode('utf-8')
    ids = np.concatenate([[TFF_BOS], _TFF_TABLE[np.frombuffer(snippet, np.uint8)], [TFF_EOS]])
    return np.pad(ids, (0, -len(ids) % row)).astype(np.int32)

  def preprocess(dataset: _federated_data.ClientDataset) -> _federated_data.ClientDataset:
    if 'snippets' not in dataset:
      raise KeyError(
        f"shakespeare_tff_preprocess needs a 'snippets' feature; got {sorted(dataset)}"
      )
    snippets = np.asarray(dataset['snippets']).reshape(-1)
    stream = np.concatenate([tokens(s) for s in snippets] or [np.zeros(0, np.int32)])
    rows = stream.reshape(-1, row)
    return {'x': rows[:, :-1], 'y': rows[:, 1:]}

  return preprocess
