"""Where a kit is written: --overwrite replaces only a kit, a failed build keeps the old kit, the swap undoes
itself, and folders left by killed runs are cleaned (dead pid) or reported (live pid). Wheels are stubbed."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from img2prompt.kit import build as kaggle_kit, folder as kit_folder
from img2prompt.errors import UserError
from img2prompt.kit.build import KitOptions, build_kit
from kit_helpers import stub_wheels


def dead_pid() -> int:
    """The pid of a process that has exited (and was reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def fake_kit(folder: Path, label: str) -> Path:
    folder.mkdir(parents=True)
    (folder / "kit.json").write_text(json.dumps({"format": 2, "label": label}))
    (folder / "wheels").mkdir()
    (folder / "wheels" / "old.whl").write_text(label)
    return folder


def listing(folder: Path) -> list[str]:
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*"))


@pytest.fixture
def forbid_work(monkeypatch):
    """Copying the index or building a wheel fails the test: a refusal must come before any work."""
    def forbidden(*args, **kwargs):
        raise AssertionError("started building before refusing")

    monkeypatch.setattr(kaggle_kit, "copy_index", forbidden)
    monkeypatch.setattr(kaggle_kit, "build_project_wheel", forbidden)
    monkeypatch.setattr(kaggle_kit, "pip_download", forbidden)


def test_overwrite_refuses_a_folder_that_is_not_a_kit(built_index, tmp_path, forbid_work):
    out = tmp_path / "thesis"
    (out / "sub").mkdir(parents=True)
    (out / "thesis.txt").write_text("chapter 1")
    (out / "sub" / "data.csv").write_text("a,b\n1,2\n")
    before = listing(out)
    with pytest.raises(UserError, match="is not a kit .*--overwrite replaces only a kit") as caught:
        build_kit(KitOptions(index=str(built_index), out=str(out), overwrite=True))
    assert "\n" not in str(caught.value)
    assert listing(out) == before and (out / "thesis.txt").read_text() == "chapter 1"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["thesis"]  # no temp folder either


@pytest.mark.parametrize("kit_json", ["not json", "[1, 2]", '{"no": "format"}'])
def test_a_folder_with_an_unreadable_kit_json_is_not_a_kit(tmp_path, kit_json):
    (tmp_path / "kit.json").write_text(kit_json)
    assert not kit_folder.is_kit(tmp_path)
    with pytest.raises(UserError, match="is not a kit"):
        kit_folder.check_out_folder(tmp_path, "out", overwrite=True)


def test_which_existing_folders_may_be_replaced(tmp_path):
    kit = fake_kit(tmp_path / "kit", "old")
    assert kit_folder.is_kit(kit)
    kit_folder.check_out_folder(kit, "kit", overwrite=True)
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        kit_folder.check_out_folder(kit, "kit", overwrite=False)
    (tmp_path / "empty").mkdir()
    kit_folder.check_out_folder(tmp_path / "empty", "empty", overwrite=True)  # nothing in it to lose
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        kit_folder.check_out_folder(tmp_path / "file", "file", overwrite=True)
    kit_folder.check_out_folder(tmp_path / "new", "new", overwrite=False)


def test_overwrite_swaps_a_new_kit_in(built_index, tmp_path, monkeypatch):
    stub_wheels(monkeypatch)
    out = fake_kit(tmp_path / "kit", "old")
    report = build_kit(KitOptions(index=str(built_index), out=str(out), overwrite=True))
    assert not (out / "wheels" / "old.whl").exists()
    assert json.loads((out / "kit.json").read_text())["index"]["files"]
    assert (out / "submit.py").is_file() and report.leftovers == []
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]


def test_a_failed_build_keeps_the_old_kit(built_index, tmp_path, monkeypatch):
    stub_wheels(monkeypatch, fail=UserError("the wheel build broke"))
    out = fake_kit(tmp_path / "kit", "old")
    before = listing(out)
    with pytest.raises(UserError, match="the wheel build broke"):
        build_kit(KitOptions(index=str(built_index), out=str(out), overwrite=True))
    assert listing(out) == before and json.loads((out / "kit.json").read_text())["label"] == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]


def test_a_failed_swap_puts_the_old_kit_back(tmp_path, monkeypatch):
    out = fake_kit(tmp_path / "kit", "old")
    new = fake_kit(tmp_path / "kit.tmp-1", "new")
    real_rename = os.rename
    calls = []

    def rename(source, dest):
        calls.append(Path(dest).name)
        if len(calls) == 2:  # the new kit into place
            raise OSError("disk trouble")
        real_rename(source, dest)

    monkeypatch.setattr(kit_folder.os, "rename", rename)
    with pytest.raises(OSError, match="disk trouble"):
        kit_folder.swap_into_place(new, out)
    assert json.loads((out / "kit.json").read_text())["label"] == "old"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit", "kit.tmp-1"]


def test_swap_refuses_a_folder_that_stopped_being_a_kit(tmp_path):
    out = tmp_path / "kit"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    new = fake_kit(tmp_path / "kit.tmp-1", "new")
    with pytest.raises(UserError, match="no longer a kit"):
        kit_folder.swap_into_place(new, out)
    assert (out / "notes.txt").read_text() == "mine"


def test_leftovers_of_dead_runs_are_removed_and_live_ones_reported(tmp_path):
    out = fake_kit(tmp_path / "kit", "current")
    dead, alive = dead_pid(), os.getppid()
    fake_kit(tmp_path / f"kit.tmp-{dead}", "half-built")
    fake_kit(tmp_path / f"kit.old-{dead}", "replaced")
    fake_kit(tmp_path / f"kit.tmp-{alive}", "being built")
    (tmp_path / "kit.tmp-notapid").mkdir()  # not ours: left alone, not reported
    (tmp_path / "other.tmp-1").mkdir()
    notes = kit_folder.clean_leftovers(out)
    assert sorted(path.name for path in tmp_path.iterdir()) == \
        sorted(["kit", f"kit.tmp-{alive}", "kit.tmp-notapid", "other.tmp-1"])
    assert len(notes) == 3
    assert any(f"kit.tmp-{alive}" in note and "left alone" in note for note in notes)
    assert sum("removed" in note and f"pid {dead}" in note for note in notes) == 2
    assert json.loads((out / "kit.json").read_text())["label"] == "current"


def test_a_kit_moved_aside_by_a_killed_swap_is_restored(tmp_path):
    out = tmp_path / "kit"
    dead = dead_pid()
    fake_kit(tmp_path / f"kit.old-{dead}", "previous")
    fake_kit(tmp_path / f"kit.tmp-{dead}", "maybe complete")
    notes = kit_folder.clean_leftovers(out)
    assert json.loads((out / "kit.json").read_text())["label"] == "previous"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]
    assert any("restored" in note for note in notes)


def test_the_next_build_cleans_and_reports_leftovers(built_index, tmp_path, monkeypatch):
    stub_wheels(monkeypatch)
    dead = dead_pid()
    fake_kit(tmp_path / f"kit.tmp-{dead}", "half-built")
    report = build_kit(KitOptions(index=str(built_index), out=str(tmp_path / "kit")))
    assert sorted(path.name for path in tmp_path.iterdir()) == ["kit"]
    assert len(report.leftovers) == 1 and f"kit.tmp-{dead}" in report.leftovers[0]
    assert f"note: removed {tmp_path / f'kit.tmp-{dead}'}" in kaggle_kit.format_kit_report(report)
