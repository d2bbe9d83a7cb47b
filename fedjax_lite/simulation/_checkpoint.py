"""`FileCheckpointManager`: atomic, checksummed checkpoints of a whole process state.

A checkpoint file `<prefix><round_num>.msgpack` holds a 20-byte header (8 magic bytes, the
payload's length as a little-endian uint64, its CRC-32 as a uint32) and a payload serialized with
`flax.serialization.msgpack_serialize`: the round number, a JSON metadata string, the state's
leaf paths and its leaves as numpy arrays (raw bytes plus dtype and shape, so every dtype
round-trips bitwise). Files are written with `_files.atomic_write` (temporary file, fsync,
rename), so a crash mid-write never damages the last good checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
import zlib
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from fedjax_lite import tree as tree_lib
from fedjax_lite.simulation import _files

_MAGIC = b'FJLCKPT1'
_HEADER = struct.Struct('<8sQI')  # magic, payload length, payload CRC-32
_SUFFIX = '.msgpack'
_PAYLOAD_KEYS = {'round_num', 'metadata', 'paths', 'leaves'}


class _CorruptCheckpointError(ValueError):
  """A checkpoint file that cannot be read back (truncated, overwritten, not a checkpoint)."""


class FileCheckpointManager:
  """Saves and restores process states under `root_dir`, one file per saved round.

  Like TFF's `tff.simulation.FileCheckpointManager` (and `tff.program.FileProgramStateManager`):
  `load_latest_checkpoint(structure)` restores the most recent round into the structure of a
  fresh state, and `(None, 0)` means there is nothing to resume. A latest file that cannot be
  read (a truncated or overwritten file) is reported with a warning and the previous one is
  used; if no file is readable, loading raises instead of starting over.

  Example:
    >>> manager = fl.simulation.FileCheckpointManager('run/checkpoints', metadata={'seed': 0})
    >>> manager.save_checkpoint(state, round_num=3)
    >>> state, round_num = manager.load_latest_checkpoint(jax.eval_shape(process.initialize))
  """

  def __init__(
    self,
    root_dir: str | os.PathLike,
    keep: int | None = 3,
    prefix: str = 'ckpt_',
    metadata: Mapping[str, Any] | None = None,
  ):
    """Args:
    root_dir: folder of the checkpoint files (created on the first save).
    keep: how many of the latest checkpoints to keep (>= 1); older ones are deleted after each
      successful save, except those marked with `mark_kept` (`run_training_process` marks the
      final round of every completed run, so extending a run never deletes its result). None
      keeps all. Keep at least 2 to be able to fall back from a damaged latest file.
    prefix: file name prefix; files are `<prefix><round_num>.msgpack`.
    metadata: a JSON-serializable mapping stored in every checkpoint (e.g. the run's
      configuration and sampler seed); read it back with `load_metadata`.
    """
    if keep is not None and (not isinstance(keep, int) or isinstance(keep, bool) or keep < 1):
      raise ValueError(f'keep must be an int >= 1 or None; got {keep!r}')
    if not isinstance(prefix, str) or not prefix or os.sep in prefix or prefix.startswith('.'):
      raise ValueError(
        f'prefix must be a non-empty file name prefix not starting with "."; got {prefix!r}'
      )
    self._root_dir = os.fspath(root_dir)
    self._keep = keep
    self._prefix = prefix
    self._metadata = _metadata_json(metadata, 'metadata')
    self._pattern = re.compile(re.escape(prefix) + r'(\d+)' + re.escape(_SUFFIX))

  @property
  def root_dir(self) -> str:
    return self._root_dir

  def checkpoint_path(self, round_num: int) -> str:
    """The file of round `round_num` (whether or not it exists)."""
    return os.path.join(self._root_dir, f'{self._prefix}{round_num}{_SUFFIX}')

  def checkpoint_rounds(self) -> list[int]:
    """The rounds that have a checkpoint file, ascending (readable or not)."""
    try:
      names = os.listdir(self._root_dir)
    except FileNotFoundError:
      return []
    return sorted(int(m.group(1)) for m in map(self._pattern.fullmatch, names) if m)

  def save_checkpoint(
    self, state: Any, round_num: int, metadata: Mapping[str, Any] | None = None
  ) -> str:
    """Writes `state` (a pytree of arrays) as the checkpoint of `round_num`; returns its path.

    Args:
      state: the process state.
      round_num: the round the state is the result of (>= 0; 0 is the initial state).
      metadata: JSON-serializable mapping stored instead of the manager's `metadata`.
    """
    _check_round_num(round_num)
    meta = self._metadata if metadata is None else _metadata_json(metadata, 'metadata')
    flat, _ = jax.tree_util.tree_flatten_with_path(state)
    paths, leaves = [], []
    for path, leaf in flat:
      if jax.dtypes.issubdtype(jnp.result_type(leaf), jax.dtypes.prng_key):
        raise TypeError(
          f'state leaf {tree_lib.keystr(path)} is a typed PRNG key array, which has no byte '
          'form. Tip: keep raw keys in state (jax.random.key_data / jax.random.PRNGKey).'
        )
      paths.append(tree_lib.keystr(path))
      leaves.append(np.asarray(jax.device_get(leaf)))
    payload = serialization.msgpack_serialize(
      {'round_num': round_num, 'metadata': meta, 'paths': paths, 'leaves': leaves}
    )
    header = _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload))
    path = self.checkpoint_path(round_num)
    _files.atomic_write(path, header + payload)
    if self._keep is not None:
      for old in self.checkpoint_rounds()[: -self._keep]:
        if not os.path.exists(self._kept_marker(old)):
          os.remove(self.checkpoint_path(old))
    return path

  def _kept_marker(self, round_num: int) -> str:
    return os.path.join(self._root_dir, f'{self._prefix}{round_num}.kept')

  def mark_kept(self, round_num: int) -> None:
    """Exempts the checkpoint of `round_num` from pruning by `keep` (a marker file beside it)."""
    _check_round_num(round_num)
    if not os.path.exists(self.checkpoint_path(round_num)):
      raise FileNotFoundError(f'no checkpoint of round {round_num} to keep in {self._root_dir}')
    _files.atomic_write(self._kept_marker(round_num), b'')

  def latest_readable_round(self) -> int | None:
    """The round `load_latest_checkpoint` would restore (damaged files skipped), or None."""
    for round_num in reversed(self.checkpoint_rounds()):
      try:
        _read(self.checkpoint_path(round_num), round_num)
      except _CorruptCheckpointError:
        continue
      return round_num
    return None

  def load_checkpoint(self, structure: Any, round_num: int) -> Any:
    """The state saved at `round_num`, restored into `structure`.

    Args:
      structure: a state or its `jax.eval_shape` (e.g. `jax.eval_shape(process.initialize)`);
        the checkpoint must have the same leaf paths, shapes and dtypes.

    Raises:
      FileNotFoundError: no checkpoint for `round_num`.
      ValueError: the file is damaged, or its state does not fit `structure` (the message names
        the first mismatching leaf and both specs).
    """
    _check_round_num(round_num)
    path = self.checkpoint_path(round_num)
    if not os.path.exists(path):
      raise FileNotFoundError(
        f'no checkpoint for round_num={round_num} ({path}); saved rounds: '
        f'{self.checkpoint_rounds()}'
      )
    return _restore(_read(path, round_num), structure, path)

  def load_latest_checkpoint(self, structure: Any) -> tuple[Any, int]:
    """`(state, round_num)` of the latest readable checkpoint, or `(None, 0)` if there is none.

    A damaged file is skipped with a warning naming it, falling back to the previous round.

    Raises:
      ValueError: checkpoint files exist but none is readable, or the latest readable one does
        not fit `structure` (a different process; this is never skipped over).
    """
    rounds = self.checkpoint_rounds()
    for round_num in reversed(rounds):
      path = self.checkpoint_path(round_num)
      try:
        payload = _read(path, round_num)
      except _CorruptCheckpointError as e:
        warnings.warn(
          f'checkpoint {path} is unreadable ({e}); falling back to the previous checkpoint',
          RuntimeWarning,
          stacklevel=2,
        )
        continue
      return _restore(payload, structure, path), round_num
    if rounds:
      raise ValueError(
        f'none of the checkpoints in {self._root_dir} (rounds {rounds}) is readable. Tip: move '
        'them away to start the run over, or point the run at another folder.'
      )
    return None, 0

  def load_metadata(self, round_num: int | None = None) -> dict[str, Any]:
    """The metadata stored with `round_num` (default: the latest readable checkpoint)."""
    if round_num is None:
      for r in reversed(self.checkpoint_rounds()):
        try:
          return json.loads(_read(self.checkpoint_path(r), r)['metadata'])
        except _CorruptCheckpointError:
          continue
      raise FileNotFoundError(f'no readable checkpoint in {self._root_dir}')
    _check_round_num(round_num)
    return json.loads(_read(self.checkpoint_path(round_num), round_num)['metadata'])


def _check_round_num(round_num: Any) -> None:
  if not isinstance(round_num, int | np.integer) or isinstance(round_num, bool) or round_num < 0:
    raise ValueError(f'round_num must be an int >= 0; got {round_num!r}')


def _metadata_json(metadata: Mapping[str, Any] | None, name: str) -> str:
  if metadata is None:
    return '{}'
  if not isinstance(metadata, Mapping):
    raise TypeError(f'{name} must be a mapping; got {type(metadata).__name__}')
  try:
    return json.dumps(dict(metadata), sort_keys=True)
  except (TypeError, ValueError) as e:
    raise TypeError(f'{name} must be JSON-serializable: {e}') from e


def _read(path: str, round_num: int) -> dict[str, Any]:
  """The payload of a checkpoint file; `_CorruptCheckpointError` if it is damaged."""
  try:
    with open(path, 'rb') as f:
      data = f.read()
  except FileNotFoundError:
    raise
  except OSError as e:
    raise _CorruptCheckpointError(f'cannot be read: {e}') from e
  if len(data) < _HEADER.size:
    raise _CorruptCheckpointError(f'{len(data)} bytes, shorter than the header')
  magic, length, crc = _HEADER.unpack_from(data)
  payload = data[_HEADER.size :]
  if magic != _MAGIC:
    raise _CorruptCheckpointError('not a fedjax_lite checkpoint (bad magic bytes)')
  if len(payload) != length:
    raise _CorruptCheckpointError(f'payload is {len(payload)} bytes; the header says {length}')
  if zlib.crc32(payload) != crc:
    raise _CorruptCheckpointError('payload checksum mismatch')
  try:
    content = serialization.msgpack_restore(payload)
  except Exception as e:  # msgpack raises several unrelated types on bad input
    raise _CorruptCheckpointError(f'cannot be decoded: {e}') from e
  if not isinstance(content, dict) or set(content) != _PAYLOAD_KEYS:
    raise _CorruptCheckpointError('unexpected payload layout')
  if content['round_num'] != round_num:
    raise _CorruptCheckpointError(f'holds round {content["round_num"]}, not {round_num}')
  return content


def _restore(payload: dict[str, Any], structure: Any, path: str) -> Any:
  """The payload's leaves put in `structure`'s tree; ValueError naming the first mismatch."""
  flat, treedef = jax.tree_util.tree_flatten_with_path(structure)
  expected_paths = [tree_lib.keystr(p) for p, _ in flat]
  got_paths = list(payload['paths'])
  where = f'checkpoint {path} does not fit the given state structure'
  if expected_paths != got_paths:
    missing = [p for p in expected_paths if p not in set(got_paths)]
    extra = [p for p in got_paths if p not in set(expected_paths)]
    if missing:
      detail = f'leaf {missing[0]} is missing from the checkpoint'
    elif extra:
      detail = f'the checkpoint has leaf {extra[0]}, which the structure lacks'
    else:
      detail = 'its leaves come in a different order'
    raise ValueError(
      f'{where}: {detail} ({len(got_paths)} leaves saved, {len(expected_paths)} expected). '
      'Tip: resume with the same algorithm, model and optimizers as the run that saved it.'
    )
  leaves = [np.asarray(x) for x in payload['leaves']]
  mismatch = tree_lib.tree_spec_mismatch(structure, jax.tree.unflatten(treedef, leaves))
  if mismatch is not None:
    raise ValueError(f'{where}: {mismatch} (leaf as saved; expected from the structure)')
  return jax.tree.unflatten(treedef, [jnp.asarray(x) for x in leaves])
