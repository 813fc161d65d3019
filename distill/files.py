"""Small file helpers shared by every stage: atomic writes and JSON records.

Artefacts and records are written to a temporary file in the same folder
and renamed over the target, so a kill never leaves half a file and a reader
sees either the old or the new contents.
"""

from __future__ import annotations

import json
import os


def write_atomic(path: str, data: bytes | str) -> str:
  """Writes bytes or text to `path` through a temporary file and a rename."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(data.encode() if isinstance(data, str) else data)
  os.replace(tmp, path)
  return path


def read_json(path: str, default):
  """The JSON content of `path`, or `default` when there is no such file."""
  if not os.path.exists(path):
    return default
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj) -> str:
  return write_atomic(path, json.dumps(obj, indent=1))
