"""Boundaries of index/folder_decision.py the decision table leaves open (issue 35, the mutation pass): the
field values a decision and a snapshot carry written out literally (the table compares against the dataclass's
own defaults), the snapshot of a folder with no staging folder / only leftovers in it, every changed setting
named in a refused resume, and decisions and snapshots being fixed values."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from img2prompt.index.folder_decision import (DONE, FRESH, REFUSE, FolderDecision, FolderState, decide_folder)
from img2prompt.index.layout import FORMAT_VERSION, LOCK, staging_folder

BUILD = {"clip": "ViT-B-32", "shard_size": 1000}
DECISION_FIELDS = {"action", "rebuild", "drop_staging", "swap_staged", "message", "keep_lock_file"}


def complete(build: dict = BUILD) -> dict:
    return {"state": "complete", "build": build, "format_version": FORMAT_VERSION}


def test_a_resume_of_the_finished_job_swaps_nothing():
    """Done with the index in place: no staged rebuild to swap in, nothing dropped, no lock file kept."""
    decision = decide_folder(FolderState(Path("/data/idx"), complete()), BUILD, resume=True)
    assert vars(decision) == {"action": DONE, "rebuild": False, "drop_staging": None, "swap_staged": False,
                              "message": None, "keep_lock_file": False}


def test_a_new_folder_starts_fresh_with_nothing_to_drop():
    decision = decide_folder(FolderState(Path("/data/idx")), BUILD)
    assert vars(decision) == {"action": FRESH, "rebuild": False, "drop_staging": None, "swap_staged": False,
                              "message": None, "keep_lock_file": False}


def test_the_snapshot_of_a_foreign_folder_claims_no_staging_folder(tmp_path):
    state = FolderState.read(tmp_path, None, True, False)
    assert vars(state) == {"final": tmp_path, "manifest": None, "foreign": True, "staged": None,
                           "staging_exists": False, "staging_only_leftovers": False, "mount_point": False,
                           "had_lock_file": False}


def test_a_folder_without_staging_folder_has_no_leftovers_to_drop(tmp_path):
    final = tmp_path / "idx"
    final.mkdir()
    state = FolderState.read(final, None, False, False)
    assert not state.staging_exists and state.staged is None and state.staging_only_leftovers is False
    assert decide_folder(state, BUILD).drop_staging is None


def test_a_staging_folder_of_only_leftovers_is_seen_and_dropped(tmp_path):
    """A rebuild killed before its first manifest leaves a staging folder with a lock file only: an orphan."""
    final = tmp_path / "idx"
    final.mkdir()
    staging = staging_folder(final)
    staging.mkdir()
    (staging / LOCK).write_text("123\n")
    state = FolderState.read(final, None, False, False)
    assert state.staging_exists and state.staged is None and state.staging_only_leftovers is True
    assert decide_folder(state, BUILD).drop_staging is not None


def test_a_refused_resume_names_settings_added_and_removed():
    """Every setting that differs is named: changed, only in the new build, only in the interrupted one."""
    existing = {"state": "building", "format_version": FORMAT_VERSION, "shards": [],
                "build": {"clip": "ViT-L-14", "shard_size": 1000, "column": "prompt"}}
    new = {"clip": "ViT-B-32", "shard_size": 1000, "precision": "fp32"}
    decision = decide_folder(FolderState(Path("/data/idx"), existing), new, resume=True)
    assert decision.action == REFUSE
    assert "interrupted build (clip, column, precision); rerun" in decision.message


def test_the_flags_are_keyword_only():
    """decide_folder(state, build, True) would silently mean --resume or --overwrite by position: refused."""
    with pytest.raises(TypeError):
        decide_folder(FolderState(Path("/data/idx")), BUILD, True)
    assert decide_folder(folder=FolderState(Path("/data/idx")), build=BUILD).action == FRESH


def test_decisions_and_snapshots_are_fixed_values():
    """The writer carries out the decision it was given; neither it nor the snapshot can be changed after."""
    decision = FolderDecision(FRESH)
    with pytest.raises(dataclasses.FrozenInstanceError):
        decision.rebuild = True
    state = FolderState(Path("/data/idx"))
    with pytest.raises(dataclasses.FrozenInstanceError):
        state.foreign = True
    assert set(vars(decision)) == DECISION_FIELDS
