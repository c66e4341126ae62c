"""Errors that taskvec reports to users as one line."""


class TaskvecError(Exception):
    """A user-facing error: the CLI prints ``error: <message>`` on one line and exits 2.

    Raise it for anything the user can fix (bad input, mismatched models, bad
    parameters). The message must name the cause and fit on one line.
    """

    exit_code = 2

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


class HomologyError(TaskvecError):
    """Two checkpoints or vectors do not share names, shapes, dtypes or base hash."""


class FormatError(TaskvecError):
    """A file is not a valid safetensors / task-vector file."""


class WriteError(TaskvecError, OSError):
    """An OS error while writing an output (disk full, read-only file system, permission denied),
    reported as one line naming the user's path. Still an ``OSError`` for code that catches those."""
