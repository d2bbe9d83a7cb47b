"""`RunFolderLock`: one process at a time writes a run folder.

Two processes training into the same folder would interleave their metrics rows and
checkpoints. The lock is an advisory `flock` on `<folder>/.lock`, held while the run writes and
released by the operating system when the process ends however it ends, so a killed run never
leaves a stale lock. The file records its holder (pid, host, start time) for the error message.
"""

from __future__ import annotations

import datetime
import os
import socket

try:
  import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
  fcntl = None

LOCK_FILE = '.lock'


class RunFolderInUseError(RuntimeError):
  """Another live process holds the run folder."""


class RunFolderLock:
  """Context manager holding the lock of `folder` (created if missing).

  Example:
    >>> with fl.simulation.RunFolderLock('runs/digits'):
    ...   fl.simulation.run_training_process(...)

  Raises:
    RunFolderInUseError: on entry, when another process holds it; the message names the holder.
  """

  def __init__(self, folder: str | os.PathLike):
    self._path = os.path.join(os.fspath(folder), LOCK_FILE)
    self._file = None

  def __enter__(self) -> RunFolderLock:
    os.makedirs(os.path.dirname(self._path), exist_ok=True)
    # Opened without truncating: a refused process must not erase the holder's record.
    file = open(self._path, 'a+')
    if fcntl is not None:
      try:
        fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
      except BlockingIOError:
        file.seek(0)
        holder = file.read().strip() or 'another process'
        file.close()
        raise RunFolderInUseError(
          f'{os.path.dirname(self._path)} is in use by {holder}; wait for it to finish, stop it, '
          'or pass another --out'
        ) from None
    file.seek(0)
    file.truncate()
    started = datetime.datetime.now().isoformat(timespec='seconds')
    file.write(f'process {os.getpid()} on {socket.gethostname()} (since {started})\n')
    file.flush()
    self._file = file
    return self

  def __exit__(self, *exc_info) -> None:
    if self._file is not None:
      self._file.close()  # closing releases the flock
      self._file = None
