"""The one exception that means "bad input": a config, path, argument or file the user gave that cannot be used.

The command line maps it, and nothing else, to exit status 2 with one line `ddaebm: error: …`; any other
exception is a bug or a failure of the machine and keeps its traceback (exit 1).
"""


class BadInput(Exception):
    """Input that cannot be used; the message names the key, argument or file at fault."""


class MissingFile(BadInput, FileNotFoundError):
    """A file or folder the user named (a shard set, weights, a checkpoint) is not there."""


class BadValue(BadInput, ValueError):
    """A value the user gave, or a file they pointed at, that cannot be used (a malformed manifest, a set spec)."""
