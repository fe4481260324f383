"""Small file helpers shared by the modules that write run-directory artefacts."""

from __future__ import annotations

import os
import uuid


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
  """Writes `data` to `path` so that readers see either the old file or the whole new one.

  The temporary file sits in the target's directory (so `os.replace` is a rename within one
  filesystem, hence atomic) under a unique name (so concurrent writers never share it), and is
  created with the default mode: unlike `tempfile.mkstemp`'s private 0600 files, run
  directories are meant to be shared.
  """
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{uuid.uuid4().hex}.tmp")
  try:
    with open(tmp, "xb") as f:
      f.write(data.encode("utf-8") if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
