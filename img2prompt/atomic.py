"""Atomic file writes: write a unique temp file beside NAME, fsync, rename over NAME, fsync the folder.

A crash at any moment leaves either the old file or the new one, never a half-written one. The temp name
is unique per write (pid + random), so two concurrent writers of one NAME never share a temp file: each
renames a complete file into place and the last rename wins.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
from pathlib import Path
from typing import IO, Any, Callable, Iterator

from img2prompt.errors import short_reason


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's tofile on a full disk: no errno, no file
NO_SPACE = "No space left on device"


def write_error(target: Path, tmp: Path, exc: OSError) -> OSError | None:
    """The OSError of writing `target` as one that names `target` (not its temp file) and says "No space left
    on device" where that is the cause; None for an error about another file (a source read meanwhile)."""
    if exc.filename not in (None, str(tmp), str(target)):
        return None
    text = str(exc)
    if exc.errno == errno.ENOSPC or NO_SPACE.lower() in text.lower():
        return OSError(errno.ENOSPC, NO_SPACE, str(target))
    if _SHORT_WRITE.search(text):  # a short write: the disk (or the quota) is full
        return OSError(errno.ENOSPC, f"{NO_SPACE} ({_SHORT_WRITE.search(text)[0]})", str(target))
    return OSError(exc.errno, exc.strerror or short_reason(exc), str(target))


@contextlib.contextmanager
def atomic_path(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path next to `target`; on success fsync it and rename it over `target`.

    An OSError while writing, syncing or renaming (a full disk, a read-only folder) is raised again naming
    `target` with the OS's reason (the CLI prints it as one line); the temp file is removed."""
    target = Path(target)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except OSError as exc:
        error = write_error(target, tmp, exc)
        if error is None:
            raise
        raise error from exc
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)


def write_atomic(target: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> None:
    """Call write(handle) on a binary temp file, then atomically move it to `target`."""
    with atomic_path(target) as tmp:
        with open(tmp, "wb") as handle:
            write(handle)


def write_json_atomic(target: str | os.PathLike, payload: Any) -> None:
    data = (json.dumps(payload, indent=2, sort_keys=False) + "\n").encode("utf-8")
    write_atomic(target, lambda handle: handle.write(data))
