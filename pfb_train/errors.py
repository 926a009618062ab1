"""The exceptions that end a run, and how the CLI reports each (one line, no traceback)."""


class UserError(Exception):
    """Bad input a user can fix (config, path, data). The CLI prints the message and exits with 2."""


class TrainingStopped(RuntimeError):
    """The run cannot go on (e.g. the loss keeps diverging); the message says why. Exit code 1."""


class RunFinished(Exception):
    """The run asked for is already finished; nothing was done. The CLI prints the message and exits with 0."""


class Preempted(Exception):
    """A stop signal arrived and the checkpoint is written. The CLI exits with 128 + signal number."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum


def first_line(error: Exception, otherwise: str = "") -> str:
    """The first line of an exception's message, for a one-line error (`otherwise`, or the exception's
    type name, when it has none)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else (otherwise or type(error).__name__)


def squeezed(error: Exception, limit: int = 160) -> str:
    """An exception's whole message on one line, whitespace collapsed, at most `limit` characters."""
    return " ".join(str(error).split())[:limit]
