"""What a build does with its output folder (index/folder_decision.py), as a table of folder states: each row
is a snapshot of the folder, the flags, and the decision IndexWriter then carries out."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from img2prompt.index.folder_decision import (DONE, FRESH, REFUSE, RESUME, STAGING_COMPLETE, STAGING_ORPHAN,
                                              FolderDecision, FolderState, decide_folder, is_foreign)
from img2prompt.index.layout import FORMAT_VERSION, LOCK, MANIFEST, staging_folder

FINAL = Path("/data/idx")
BUILD = {"clip": "ViT-B-32", "shard_size": 1000}
OTHER = {"clip": "ViT-L-14", "shard_size": 1000}


def building(build: dict = BUILD, shards: int = 2, version: int = FORMAT_VERSION) -> dict:
    return {"state": "building", "build": build, "format_version": version, "shards": [{}] * shards}


def complete(build: dict = BUILD) -> dict:
    return {"state": "complete", "build": build, "format_version": FORMAT_VERSION}


def folder(manifest=None, **fields) -> FolderState:
    return FolderState(FINAL, manifest, **fields)


# (folder state, flags, expected decision, the refusal's message pattern or None)
TABLE = [
    # a new or empty folder (or one holding only a killed build's lock and temp files)
    ("new folder", folder(), {}, FolderDecision(FRESH), None),
    ("new, --resume", folder(), {"resume": True}, FolderDecision(FRESH), None),
    ("new, a .lock left", folder(had_lock_file=True), {}, FolderDecision(FRESH, keep_lock_file=True), None),
    ("new, an orphan staged rebuild", folder(staged=building(), staging_exists=True), {},
     FolderDecision(FRESH, drop_staging=STAGING_ORPHAN), None),
    ("new, an empty staging folder", folder(staging_exists=True, staging_only_leftovers=True), {},
     FolderDecision(FRESH, drop_staging=STAGING_ORPHAN), None),
    ("new, a staging folder with user files", folder(staging_exists=True), {}, FolderDecision(FRESH), None),
    # someone else's files
    ("foreign files", folder(foreign=True), {}, FolderDecision(REFUSE), r"^/data/idx exists, is not empty and is "
     r"not an index: choose another --out$"),
    ("foreign, --overwrite", folder(foreign=True), {"overwrite": True}, FolderDecision(REFUSE),
     r"--overwrite only replaces an index, never other files\)$"),
    ("foreign, a .lock of the user's", folder(foreign=True, had_lock_file=True), {},
     FolderDecision(REFUSE, keep_lock_file=True), "is not an index"),
    # an unfinished build
    ("unfinished", folder(building()), {}, FolderDecision(REFUSE),
     r"holds an unfinished build \(2 shards done\): pass --resume to continue it or --overwrite to start over"),
    ("unfinished, --resume", folder(building()), {"resume": True}, FolderDecision(RESUME), None),
    ("unfinished, --overwrite", folder(building()), {"overwrite": True}, FolderDecision(FRESH), None),
    ("unfinished, --resume --overwrite", folder(building()), {"resume": True, "overwrite": True},
     FolderDecision(RESUME), None),
    ("unfinished, --resume, other settings", folder(building(OTHER)), {"resume": True}, FolderDecision(REFUSE),
     r"cannot resume, the build settings differ from the interrupted build \(clip\); rerun with --overwrite"),
    ("unfinished, --resume, another version", folder(building(version=FORMAT_VERSION - 1)), {"resume": True},
     FolderDecision(REFUSE), rf"another img2prompt version \(format {FORMAT_VERSION - 1}\); rerun with --overwrite"),
    ("unfinished + orphan staging, no flag", folder(building(), staged=building(), staging_exists=True,
                                                    had_lock_file=True), {},
     FolderDecision(REFUSE, drop_staging=STAGING_ORPHAN, keep_lock_file=True), "unfinished build"),
    # a complete index
    ("complete", folder(complete()), {}, FolderDecision(REFUSE),
     r"^/data/idx already holds a complete index: pass --overwrite to replace it$"),
    ("complete, a .lock left (a complete index keeps none)", folder(complete(), had_lock_file=True), {},
     FolderDecision(REFUSE), "already holds a complete index"),
    ("complete, --overwrite", folder(complete()), {"overwrite": True}, FolderDecision(FRESH, rebuild=True), None),
    ("complete, --resume of this very job", folder(complete()), {"resume": True}, FolderDecision(DONE), None),
    ("complete, --resume, another job", folder(complete(OTHER)), {"resume": True}, FolderDecision(REFUSE),
     "already holds a complete index"),
    ("complete, --resume --overwrite, another job", folder(complete(OTHER)), {"resume": True, "overwrite": True},
     FolderDecision(FRESH, rebuild=True), None),
    ("complete + this job's staged rebuild, killed before its swap",
     folder(complete(OTHER), staged=complete(), staging_exists=True), {"resume": True},
     FolderDecision(DONE, swap_staged=True), None),
    ("complete + a complete staging folder of another job, --resume",
     folder(complete(OTHER), staged=complete(OTHER), staging_exists=True), {"resume": True},
     FolderDecision(REFUSE, drop_staging=STAGING_COMPLETE), "already holds a complete index"),
    ("complete + a complete staging folder, --overwrite",
     folder(complete(), staged=complete(OTHER), staging_exists=True), {"overwrite": True},
     FolderDecision(FRESH, rebuild=True, drop_staging=STAGING_COMPLETE), None),
    ("complete + an unfinished rebuild, --resume", folder(complete(OTHER), staged=building(), staging_exists=True),
     {"resume": True}, FolderDecision(RESUME, rebuild=True), None),
    ("complete + an unfinished rebuild, --resume, other settings",
     folder(complete(OTHER), staged=building(OTHER), staging_exists=True), {"resume": True},
     FolderDecision(REFUSE), "cannot resume, the build settings differ"),
    ("complete + an unfinished rebuild, no flag", folder(complete(), staged=building(), staging_exists=True), {},
     FolderDecision(REFUSE), "already holds a complete index"),
    ("complete + an unfinished rebuild, --overwrite (starts over)",
     folder(complete(), staged=building(), staging_exists=True), {"overwrite": True},
     FolderDecision(FRESH, rebuild=True), None),
    ("complete, a mount point, --overwrite", folder(complete(), mount_point=True), {"overwrite": True},
     FolderDecision(REFUSE), r"^--out /data/idx is a mount point: a rebuild is written beside it and swapped in"),
    ("complete, a mount point, --resume of this very job", folder(complete(), mount_point=True),
     {"resume": True}, FolderDecision(DONE), None),
]


@pytest.mark.parametrize("state, flags, expected, message", [row[1:] for row in TABLE],
                         ids=[row[0] for row in TABLE])
def test_decision_table(state, flags, expected, message):
    decision = decide_folder(state, BUILD, **flags)
    assert {**vars(decision), "message": None} == vars(expected)
    if message is None:
        assert decision.message is None
    else:
        assert decision.message is not None and re.search(message, decision.message)


def test_the_snapshot_of_real_folders(tmp_path):
    """FolderState.read sees what the table's rows stand for: a foreign folder, leftovers, a staged rebuild."""
    final = tmp_path / "idx"
    final.mkdir()
    (final / LOCK).write_text("123\n")
    (final / ".prompts.parquet.99999.abc123.tmp").write_bytes(b"x")
    assert not is_foreign(final, None)  # only a killed build's lock and temp files
    staging = staging_folder(final)
    staging.mkdir()
    (staging / MANIFEST).write_text('{"state": "building", "build": {}, "shards": []}')
    state = FolderState.read(final, None, False, True)
    assert state.staging_exists and state.staged == {"state": "building", "build": {}, "shards": []}
    assert not state.staging_only_leftovers and not state.mount_point and state.had_lock_file
    assert decide_folder(state, BUILD).drop_staging == STAGING_ORPHAN

    (final / "notes.txt").write_text("mine")
    assert is_foreign(final, None)
    assert FolderState.read(final, None, True, False) == FolderState(final, foreign=True)
