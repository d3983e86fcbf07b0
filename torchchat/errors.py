"""The one exception type for problems the user can fix (bad path, bad config, bad input)."""


class TorchchatError(Exception):
    """A user-facing error: caught once at the CLI/server edge and shown as one line."""


def one_line(error: BaseException) -> str:
    """An exception's message squeezed onto one line, for TorchchatError texts."""
    return " ".join(str(error).split()) or type(error).__name__
