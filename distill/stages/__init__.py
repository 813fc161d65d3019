"""The pipeline stages: the only code that reads or writes a workdir."""
