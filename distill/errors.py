"""The one exception type for bad user input.

Anything a user can get wrong (a path, a file, a config key, a shape) raises
`DistillError` with a one-line message naming the problem. The CLI turns it
into `error: <message>` on stderr and exit status 2; library callers can
catch it like any `ValueError`.
"""


class DistillError(ValueError):
  """Bad input: a missing file, a wrong shape, an unknown config key, ..."""


def one_line(err: BaseException) -> str:
  """`Type: first line of the message`, for wrapping a foreign exception into
  a one-line `DistillError` (just the type name when the message is empty)."""
  lines = str(err).strip().strip("'\"").splitlines()
  first = lines[0].strip() if lines else ""
  return f"{type(err).__name__}: {first}" if first else type(err).__name__
