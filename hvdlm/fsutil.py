"""The one atomic write: a reader, or a machine that crashes, sees the old file or the new one, never half of one.

`atomic_write(path, data)` and `atomic_writer(path)` (a binary file object, for writers that stream, such as
torch.save) guarantee:

- the data goes to a temporary file in the target's own directory, `.NAME.tmp-PID` (the same file system, so
  the rename is atomic; checkpoint.store removes the ones a killed save left by that name), is flushed and
  fsynced, then renamed over the target, and the directory is fsynced, so the rename itself survives a crash;
- a symbolic link is followed: its target is replaced and the link stays (as `echo > link` does), so a link
  into a shared directory keeps pointing there;
- an existing file keeps its permission bits; a new file gets the umask's default mode, as open() would give it;
- on any failure (an OSError, an exception of the caller's writer, an interrupt) the temporary file is removed,
  the old file is intact, and the exception propagates.

`atomic_writer(path, publish=False)` stops before the rename, and `publish(path)` does it later.
`fsync_directory(path)` makes the renames of entries in a directory durable, and with files=True the files in
it too (a dataset directory written in one piece, then renamed into place). Standard library only: the
job-preparation commands use this on login nodes.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

# fsync is refused by some file systems for directories (EINVAL on a few network and FUSE file systems): the rename
# has happened, and there is nothing more to make durable from here.
_UNSYNCABLE = (errno.EINVAL, errno.ENOTSUP, errno.EBADF)


def temporary_path(target: Path) -> Path:
    """Where atomic_writer stages `target`: `.NAME.tmp-PID` beside it (hidden; unique per writing process)."""
    return target.with_name(f".{target.name}.tmp-{os.getpid()}")


def fsync_directory(path: str | Path, files: bool = False) -> None:
    """Flush a directory's entries (files created, renamed or removed in it) to the disk; with `files`, the data
    of the plain files in it first (a directory about to be renamed into place in one piece)."""
    if files:
        for entry in Path(path).iterdir():
            if entry.is_file() and not entry.is_symlink():
                _fsync(entry)
    _fsync(path)


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in _UNSYNCABLE:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_writer(path: str | Path, publish: bool = True) -> Iterator[BinaryIO]:
    """A binary file to write; when the block ends without an exception it replaces `path` (see the module).

    With publish=False the data ends fsynced in the temporary file, and `publish(path)` (by the same process) puts
    it in place later: a write whose file may appear only once others agree (an asynchronous checkpoint)."""
    target = Path(os.path.realpath(path))  # through a link: the link's target is what gets replaced
    tmp = temporary_path(target)
    try:
        with _create(tmp, target) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if publish:
            os.replace(tmp, target)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or an interrupt leaves no half-written file behind
        raise
    if publish:
        fsync_directory(target.parent)


def publish(path: str | Path) -> Path:
    """Put in place the file an `atomic_writer(path, publish=False)` of this process left, atomically, and make the
    rename durable; returns the file."""
    target = Path(os.path.realpath(path))
    os.replace(temporary_path(target), target)
    fsync_directory(target.parent)
    return target


def atomic_write(path: str | Path, data: bytes | str) -> Path:
    """Replace the file at `path` with `data` (text is written as UTF-8); returns the file written (links followed)."""
    with atomic_writer(path) as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return Path(os.path.realpath(path))


def _create(tmp: Path, target: Path) -> BinaryIO:
    """A new, empty temporary file with the mode the target should end up with."""
    tmp.unlink(missing_ok=True)  # left by a killed writer whose process id this one now has
    # O_EXCL with 0o666: a fresh file whose mode the kernel takes from the umask, exactly as open(path, "w") would;
    # O_NOFOLLOW: a link planted under the temporary name is not followed.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.fchmod(fd, stat.S_IMODE(os.stat(target).st_mode))  # the file it replaces keeps its permissions
        return os.fdopen(fd, "wb")
    except BaseException:
        os.close(fd)
        raise
