"""What a build does with its output folder: `decide_folder` decides from a snapshot of the folder (a pure
function: no disk access), so every folder state is one row of a table test.

`IndexWriter` reads the folder once it holds the lock (`FolderState.read`), asks `decide_folder`, and carries
the `FolderDecision` out: start fresh, resume the unfinished build, report the job already done, or refuse
with a one-line error. A rebuild of a complete index is written in the staging folder beside it and swapped in
at the end, so a failed rebuild never costs the index it was meant to replace.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from img2prompt.index.layout import FORMAT_VERSION, STATE_BUILDING, STATE_COMPLETE, staging_folder
from img2prompt.index.lock import only_own_leftovers
from img2prompt.index.manifest import read_manifest

FRESH, RESUME, DONE, REFUSE = "fresh", "resume", "done", "refuse"
# why a staging folder is dropped (the warning names it)
STAGING_ORPHAN = "the staging folder of a rebuild whose index is gone"
STAGING_COMPLETE = "a complete index a killed rebuild left beside"


@dataclass(frozen=True)
class FolderState:
    """The output folder as the lock holder finds it."""
    final: Path  # the index folder (symlinks resolved)
    manifest: dict | None = None  # its manifest, if any
    foreign: bool = False  # no manifest, and files other than a killed build's lock and temp files
    staged: dict | None = None  # the manifest in the staging folder beside it (a rebuild's), if any
    staging_exists: bool = False
    staging_only_leftovers: bool = False  # the staging folder holds nothing but lock and temp files
    mount_point: bool = False  # the folder is a mount point (a rebuild cannot be swapped in across filesystems)
    had_lock_file: bool = False  # a .lock file was there before this build took the lock

    @classmethod
    def read(cls, final: Path, manifest: dict | None, foreign: bool, had_lock_file: bool) -> "FolderState":
        """The rest of the snapshot beside the folder's manifest and `foreign` (see `is_foreign`)."""
        if foreign:
            return cls(final, foreign=True, had_lock_file=had_lock_file)
        staging = staging_folder(final)
        exists = staging.is_dir()
        staged = read_manifest(staging) if exists else None
        return cls(final, manifest, staged=staged, staging_exists=exists,
                   staging_only_leftovers=exists and staged is None and only_own_leftovers(staging),
                   mount_point=os.stat(final).st_dev != os.stat(final.parent).st_dev, had_lock_file=had_lock_file)


def is_foreign(final: Path, manifest: dict | None) -> bool:
    """A folder without a manifest holding more than what a build killed before its first manifest leaves."""
    return manifest is None and not only_own_leftovers(final)


@dataclass(frozen=True)
class FolderDecision:
    action: str  # FRESH, RESUME, DONE or REFUSE
    rebuild: bool = False  # write in the staging folder and swap it in at the end (RESUME: the staged build)
    drop_staging: str | None = None  # the staging folder goes first (before a refusal too), for this reason
    swap_staged: bool = False  # DONE: this job's complete rebuild waits in the staging folder; swap it in
    message: str | None = None  # REFUSE: the one-line error
    keep_lock_file: bool = False  # on close: a .lock the user's folder had stays (never for a complete index)


def decide_folder(folder: FolderState, build: dict, *, resume: bool = False,
                  overwrite: bool = False) -> FolderDecision:
    """What to do with the folder for a build of settings `build` (the manifest's "build" part)."""
    state = folder.manifest.get("state") if folder.manifest else None
    keep = folder.had_lock_file  # (a complete index's decisions keep none: see _decide_complete)
    if folder.foreign:
        return FolderDecision(REFUSE, keep_lock_file=keep, message=(
            f"{folder.final} exists, is not empty and is not an index: choose another --out"
            + (" (--overwrite only replaces an index, never other files)" if overwrite else "")))
    if state == STATE_COMPLETE:
        return _decide_complete(folder, build, resume, overwrite)
    drop = STAGING_ORPHAN if folder.staging_exists and (folder.staged is not None or
                                                        folder.staging_only_leftovers) else None
    return _decide_unfinished(folder.final, folder.manifest, build, resume, overwrite,
                              FolderDecision(FRESH, drop_staging=drop, keep_lock_file=keep))


def _decide_complete(folder: FolderState, build: dict, resume: bool, overwrite: bool) -> FolderDecision:
    """A complete index: done (resume of this very job), refused, or rebuilt beside it."""
    staged = folder.staged
    staged_complete = bool(staged) and staged.get("state") == STATE_COMPLETE
    if resume and folder.manifest.get("build") == build:
        return FolderDecision(DONE)
    if resume and staged_complete and staged.get("build") == build:
        return FolderDecision(DONE, swap_staged=True)  # killed between its final manifest and the swap
    if folder.mount_point:
        return FolderDecision(REFUSE, message=(
            f"--out {folder.final} is a mount point: a rebuild is written beside it and swapped in, which cannot "
            "cross filesystems; move the old index away first, or build into a folder inside the mount"))
    # the old index a swap retired (or a rebuild killed just before its swap): never resumable
    drop = STAGING_COMPLETE if staged_complete else None
    staged = None if staged_complete else staged
    if not overwrite and not (resume and staged and staged.get("state") == STATE_BUILDING):
        return FolderDecision(REFUSE, drop_staging=drop, message=(
            f"{folder.final} already holds a complete index: pass --overwrite to replace it"))
    fresh = FolderDecision(FRESH, rebuild=True, drop_staging=drop)
    return _decide_unfinished(folder.final, staged, build, resume, overwrite, fresh) if resume else fresh


def _decide_unfinished(final: Path, existing: dict | None, build: dict, resume: bool, overwrite: bool,
                       fresh: FolderDecision) -> FolderDecision:
    """A build that is not complete (`existing`: its manifest, or None): resumed, refused, or started over
    (`fresh`: where, and what goes first)."""
    if not existing or existing.get("state") != STATE_BUILDING:
        return fresh

    def refuse(message: str) -> FolderDecision:  # what goes first (a staging folder to drop) still goes
        return dataclasses.replace(fresh, action=REFUSE, rebuild=False, message=message)

    if not (resume or overwrite):
        return refuse(f"{final} holds an unfinished build ({len(existing.get('shards', []))} shards done): "
                      "pass --resume to continue it or --overwrite to start over")
    if not resume:
        return fresh
    if existing.get("build") != build:
        changed = sorted(key for key in set(build) | set(existing.get("build", {}))
                         if build.get(key) != existing.get("build", {}).get(key))
        return refuse(f"{final}: cannot resume, the build settings differ from the interrupted build "
                      f"({', '.join(changed)}); rerun with --overwrite to start over")
    if existing.get("format_version") != FORMAT_VERSION:
        return refuse(f"{final}: the unfinished build was started by another img2prompt version "
                      f"(format {existing.get('format_version')}); rerun with --overwrite")
    return dataclasses.replace(fresh, action=RESUME)
