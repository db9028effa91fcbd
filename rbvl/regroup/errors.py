"""The one error type of Regroup: a fatal problem with the user's input or options, shown as one line."""


class RegroupError(Exception):
    """A fatal, user-facing problem (bad option, k larger than the data, an output that already exists)."""
