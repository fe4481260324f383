"""One writer per run directory: an advisory lock held for the whole life of the process.

`WorkdirLock(workdir).acquire()` takes an exclusive `flock` on ``<workdir>/.lock`` without
waiting. The file holds the holder's pid, host and start time, so a second process on the same
workdir fails at once with ``<workdir> is in use by pid N on HOST since TIME``, before it writes
anything. The lock is the kernel's, not the file's: it is released when its process exits, however
it exits (SIGKILL and power loss included), so a lock file left by a dead process is simply taken
over, with a warning naming the process it belonged to. The file itself is never deleted (deleting
a lock file races with a process that has just opened it).

Where it works: local file systems, and NFS (Linux turns `flock` into an NFS byte-range lock, so
it holds across hosts on NFSv4 and on NFSv3 with lockd). File systems without locks (some FUSE
mounts, e.g. GCS FUSE) answer ENOLCK/EOPNOTSUPP: then the run goes on with a warning that a
second writer is not excluded. With several JAX processes (one job on several hosts), process 0
takes the lock and all of them agree on the outcome; they are one writer.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket

from jaxlm import errors

LOCK_FILE = ".lock"
_UNSUPPORTED = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


def _describe(holder: dict) -> str:
  return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')} since {holder.get('since', '?')}"


class WorkdirLock:
  """An exclusive lock on a run directory (see the module docstring). Not re-entrant.

  Usage::

    lock = WorkdirLock(workdir).acquire()   # errors.RunDirError when another process holds it
    ...                                     # the whole run
    lock.release()                          # or just exit: the kernel releases it
  """

  def __init__(self, workdir: str | os.PathLike):
    self.workdir = os.path.abspath(os.fspath(workdir))
    self.path = os.path.join(self.workdir, LOCK_FILE)
    self._fd: int | None = None

  @property
  def held(self) -> bool:
    return self._fd is not None

  def holder(self) -> dict | None:
    """The pid/host/since recorded in the lock file (the holder, or the last one), or None."""
    try:
      with open(self.path) as f:
        text = f.read().strip()
      return json.loads(text) if text else None
    except (OSError, ValueError):
      return None

  def busy_error(self) -> errors.RunDirError:
    """The error of a second process on this workdir, naming the holder the lock file records."""
    return errors.RunDirError(
        f"{self.workdir} is in use by {_describe(self.holder() or {})}: one process writes a run directory "
        "at a time; wait for it to finish (or stop it), or use another --workdir")

  def acquire(self) -> "WorkdirLock":
    """Takes the lock or raises `errors.RunDirError` naming the process that holds it."""
    if self._fd is not None:
      return self
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      os.close(fd)
      if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
        raise self.busy_error() from None
      if e.errno in _UNSUPPORTED:
        logging.warning("%s: the file system does not support locks (%s); a second process on this "
                        "workdir would not be stopped", self.workdir, e.strerror)
        return self
      raise
    self._fd = fd
    previous = self.holder()
    if previous and (previous.get("pid"), previous.get("host")) != (os.getpid(), socket.gethostname()):
      logging.warning("%s: took over the lock of %s, which is gone (it did not finish cleanly)",
                      self.workdir, _describe(previous))
    mine = {"pid": os.getpid(), "host": socket.gethostname(),
            "since": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(mine) + "\n").encode(), 0)
    os.fsync(fd)
    return self

  def release(self) -> None:
    """Clears the holder and releases the lock (exiting the process does the same)."""
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)  # An empty file: nobody to warn about next time.
    finally:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
