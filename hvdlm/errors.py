"""The one exception type for bad input (config, job file, hosts, data, checkpoint).

The CLI prints its message as one paragraph and exits with code 2, without a traceback; everything else that goes
wrong is a bug and keeps its traceback.
"""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Input the user can fix: the message says what is wrong and how to fix it."""

    exit_code = 2


def not_a_file(path: str | Path) -> str:
    """Why a file that was asked for cannot be read, for a message: "is a directory, not a file", "does not exist"
    (a directory named where a file belongs is a different mistake from a typo, with a different fix)."""
    path = Path(path)
    if path.is_dir():
        return "is a directory, not a file"
    if path.exists():
        return "is not a regular file"
    return "does not exist"
