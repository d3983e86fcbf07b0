"""The one exception type for problems the user can fix (bad path, bad config, bad input)."""


class TorchchatError(Exception):
    """A user-facing error: caught once at the CLI/server edge and shown as one line."""
