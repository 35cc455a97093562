"""The build's hold on its folder: the lock, the final swap of a rebuild, and what killed runs leave behind
(the swap and the scan for dead runs' folders serve the Kaggle kit's folder too: kit/folder.py).

Leftovers of our own that a killed build can leave: the .lock file, temp files of writes it never renamed
(.NAME.PID.RANDOM.tmp), a staging folder .NAME.rebuild, a retired old index .NAME.old-PID. The next build
(holding the lock) removes those whose writer is gone and names those whose writer still runs.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import IO

from img2prompt.atomic import fsync_dir
from img2prompt.errors import UserError
from img2prompt.index.layout import LOCK, MANIFEST, TEMP_FILE, retired_folder

log = logging.getLogger(__name__)


def lock_folder(folder: Path) -> IO[str]:
    """An exclusive lock on the output folder for the whole build; a second build gets a one-line error."""
    import fcntl

    folder.mkdir(parents=True, exist_ok=True)
    handle = open(folder / LOCK, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise UserError(f"{folder} is being written by another img2prompt build (pid {holder}): wait for it "
                        "or stop it") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def exchange_paths(first: Path, second: Path) -> bool:
    """Atomically swap two paths (renameat2 with RENAME_EXCHANGE); False where the system cannot."""
    import ctypes

    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return renameat2(at_fdcwd, os.fsencode(first), at_fdcwd, os.fsencode(second), rename_exchange) == 0


def swap_into_place(staged: Path, final: Path, retired: Path | None = None, *, exchange: bool = True) -> None:
    """Replace the complete folder at `final` with `staged`, then delete the old one: one atomic exchange of the
    two folders (Linux renameat2) where the system can and `exchange` asks for it; else two renames, `final` to
    `retired` (default .NAME.old-PID) and `staged` to `final`, the old folder put back when the second fails.
    A kill between the two renames leaves `retired` beside a missing `final`, for the next run's clean-up
    (`leftovers_beside`) to restore or remove. The index and the Kaggle kit both swap through here."""
    if not final.exists():
        os.rename(staged, final)
        fsync_dir(final.parent)
        return
    old = staged
    if not (exchange and exchange_paths(staged, final)):
        old = retired or retired_folder(final, os.getpid())
        os.rename(final, old)
        try:
            os.rename(staged, final)
        except OSError:
            os.rename(old, final)
            raise
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)


def pid_alive(pid: int) -> bool:
    """Whether the run that named a leftover after its pid still runs (never this process: what it left in an
    earlier call of this process is a leftover too, or a recycled pid's)."""
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    except OSError:
        return False
    return True


def leftovers_beside(final: Path, pattern: str) -> list[tuple[Path, re.Match, bool]]:
    """Folders beside `final` that a run left, each with its name's match and whether that run still runs:
    names that fully match `pattern` (a regex whose group `pid` is the writing process); symlinks are never
    ours. The one scan of dead runs' folders for the index (clean_retired) and the kit (kit/folder.py)."""
    if not final.parent.is_dir():
        return []
    found = []
    for path in final.parent.iterdir():
        match = re.fullmatch(pattern, path.name)
        if match is not None and path.is_dir() and not path.is_symlink():
            found.append((path, match, pid_alive(int(match["pid"]))))
    return found


def is_own_leftover(path: Path) -> bool:
    """Our lock file or an atomic write's temp file (never a user's file)."""
    return path.name == LOCK or (path.is_file() and TEMP_FILE.match(path.name) is not None)


def only_own_leftovers(folder: Path) -> bool:
    """Whether the folder holds nothing but what a build killed before its first manifest leaves."""
    return all(is_own_leftover(path) for path in folder.iterdir())


def clean_temp_files(*folders: Path) -> list[Path]:
    """Delete temp files whose writer process is gone; return those of writers still running (kept)."""
    kept = []
    for folder in folders:
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            match = TEMP_FILE.match(path.name)
            if match is None or not path.is_file():
                continue
            if pid_alive(int(match["pid"])):
                kept.append(path)
            else:
                path.unlink(missing_ok=True)
    if kept:
        log.warning("%d temp file(s) belong to processes still running (%s); left in place", len(kept),
                    ", ".join(sorted({f"pid {TEMP_FILE.match(p.name)['pid']}" for p in kept})))
    return kept


def clean_retired(final: Path) -> list[Path]:
    """Old indexes a killed swap left as .NAME.old-PID: deleted when PID is gone; returns those kept."""
    kept = []
    for path, match, alive in leftovers_beside(final, rf"\.{re.escape(final.name)}\.old-(?P<pid>\d+)"):
        if not (path / MANIFEST).is_file():
            log.warning("%s looks like a retired index but holds no %s; left in place", path, MANIFEST)
            kept.append(path)
        elif alive:
            kept.append(path)
            log.warning("%s: the build swapping it out (pid %s) still runs; left in place", path, match["pid"])
        else:
            log.info("removing %s, an old index a killed rebuild left behind", path)
            shutil.rmtree(path, ignore_errors=True)
    return kept
