"""Advisory file locks (POSIX `flock`) so concurrent edgebundle processes never clobber each other.

- A bundle `OUT/<target>/` is written under `OUT/.locks/<target>.lock`, taken without waiting: a second
  process building the same target into the same folder fails at once with an "in use" error.
  Different targets lock different files, so per-target builds fan out against one output folder.
- A work folder is prepared under `WORK/.prepare.lock`, taken with waiting: a second `prepare` of the
  same work folder waits and then finds every stage cached.

The kernel drops a `flock` when its process dies (SIGKILL included): no stale-lock cleanup is needed.
Locks are re-entrant inside one process (a run holds its targets' locks while the bundle writer takes
them again).
"""

from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

from edgebundle.core.errors import BundleError

try:
    import fcntl
except ImportError:  # pragma: no cover - non-POSIX: locking is skipped, said in the README
    fcntl = None  # type: ignore[assignment]

LOCKS = ".locks"  # OUT/.locks/<target>.lock, OUT/.locks/report.lock
_held: dict[str, list[int]] = {}  # resolved path -> [fd, depth]


@contextlib.contextmanager
def file_lock(path: Path, *, wait: bool, what: str) -> Iterator[None]:
    key = str(Path(path).resolve())
    if key in _held:
        _held[key][1] += 1
        try:
            yield
        finally:
            _held[key][1] -= 1
        return
    if fcntl is None:
        yield
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(key, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise BundleError(f"cannot create lock file {path}: {e.strerror or e}") from e
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise BundleError(f"{what} is in use by another edgebundle process (lock {path}); "
                                  "wait for it to finish or use another output folder") from e
            raise BundleError(f"cannot lock {path}: {e.strerror or e}") from e
        _held[key] = [fd, 1]
        try:
            yield
        finally:
            del _held[key]
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def target_lock(output: Path, name: str):
    """Exclusive, non-waiting lock on the bundle `output/name`."""
    return file_lock(Path(output) / LOCKS / f"{name}.lock", wait=False, what=f"bundle {Path(output) / name}")


def work_lock(work: Path):
    """Exclusive lock on a work folder; a second preparer waits for the first."""
    return file_lock(Path(work) / ".prepare.lock", wait=True, what=f"work folder {work}")
