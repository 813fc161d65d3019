"""Small file helpers shared by every stage: atomic writes and JSON records.

Artefacts and records are written to a temporary file in the same folder
and renamed over the target, so a kill never leaves half a file and a reader
sees either the old or the new contents.
"""

from __future__ import annotations

import json
import os
import secrets
from typing import BinaryIO, Callable

from distill.errors import DistillError, one_line


def write_atomic(path: str, data: bytes | str | Callable[[BinaryIO], None]) -> str:
  """Writes `data` to `path` through a temporary file beside it and a rename.

  Args:
    path: the file to create or replace; its folder is created if needed.
    data: bytes, text (written as UTF-8) or a function that writes into the
      binary file object it is given (e.g. `lambda f: np.savez(f, **arrays)`).

  Returns:
    `path`.

  Raises:
    DistillError: the file cannot be written (permissions, full disk); the
      temporary file is removed and any previous file at `path` is intact.
      Any other exception raised by `data` propagates after the same cleanup.
  """
  directory = os.path.dirname(os.path.abspath(path))
  # A hidden, random name: it matches no artefact glob and no other writer's.
  tmp = os.path.join(directory, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
  try:
    os.makedirs(directory, exist_ok=True)
    # Mode 0o666 lets the umask decide permissions, as a plain open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
  except OSError as err:
    raise DistillError(f"{path}: cannot write ({one_line(err)})") from None
  try:
    with os.fdopen(fd, "wb") as f:
      if callable(data):
        data(f)
      else:
        f.write(data.encode() if isinstance(data, str) else data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as err:
    _remove_quietly(tmp)
    raise DistillError(f"{path}: cannot write ({one_line(err)})") from None
  except BaseException:
    _remove_quietly(tmp)
    raise
  return path


def _remove_quietly(path: str) -> None:
  try:
    os.remove(path)
  except OSError:
    pass


def read_json(path: str, default):
  """The JSON content of `path`, or `default` when there is no such file."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> str:
  return write_atomic(path, json.dumps(obj, indent=1))
