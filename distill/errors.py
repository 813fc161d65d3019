"""The one exception type for bad user input.

Anything a user can get wrong (a path, a file, a config key, a shape) raises
`DistillError` with a one-line message naming the problem. The CLI turns it
into `error: <message>` on stderr and exit status 2; library callers can
catch it like any `ValueError`.
"""


class DistillError(ValueError):
  """Bad input: a missing file, a wrong shape, an unknown config key, ..."""
