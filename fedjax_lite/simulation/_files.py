"""Atomic file replacement: a reader sees the old file or the new one, never a partial one."""

from __future__ import annotations

import contextlib
import os
import uuid

TEMP_SUFFIX = '.tmp'


def atomic_write(path: str, data: bytes) -> None:
  """Writes `data` to `path` through a temporary file in the same folder, fsynced, renamed.

  The temporary file is named `.<name>.<random>.tmp`; it is removed if anything fails, and a
  process killed mid-write leaves at most such a hidden file next to an intact `path`.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  temp_path = os.path.join(
    directory, f'.{os.path.basename(path)}.{uuid.uuid4().hex[:12]}{TEMP_SUFFIX}'
  )
  # os.open with 0o666 lets the umask set the mode, as for any new file (mkstemp would use 0o600).
  fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, 'O_BINARY', 0), 0o666)
  try:
    with os.fdopen(fd, 'wb') as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(temp_path, path)
  except BaseException:
    with contextlib.suppress(FileNotFoundError):
      os.remove(temp_path)
    raise
  _fsync_directory(directory)


def _fsync_directory(directory: str) -> None:
  """Makes a rename durable (POSIX); a no-op where folders cannot be opened (Windows)."""
  try:
    fd = os.open(directory, os.O_RDONLY)
  except OSError:
    return
  try:
    os.fsync(fd)
  except OSError:
    pass
  finally:
    os.close(fd)
