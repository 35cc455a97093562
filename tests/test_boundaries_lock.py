"""Boundaries of index/lock.py (issue 35's mutation pass, docs/mutation.md): one build holds a folder (a
second gets one line naming the holder's pid), the swap replaces the index whole (atomic exchange, or two
renames where the system has none) and deletes the old one, and only our own leftovers whose writer is gone
are removed: temp files of live writers, retired indexes of live swaps and folders without a manifest stay."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from img2prompt.errors import UserError
from img2prompt.index import lock
from img2prompt.index.layout import LOCK, MANIFEST


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited (reaped: nothing answers to it now)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_lock_on_the_folder_names_the_holder(tmp_path):
    folder = tmp_path / "out"
    handle = lock.lock_folder(folder)
    try:
        assert (folder / LOCK).read_text() == f"{os.getpid()}\n"
        with pytest.raises(UserError) as caught:
            lock.lock_folder(folder)
        assert str(caught.value) == (f"{folder} is being written by another img2prompt build (pid {os.getpid()}): "
                                     "wait for it or stop it")
    finally:
        handle.close()
    again = lock.lock_folder(folder)  # released: the next build takes it and rewrites the pid
    assert (folder / LOCK).read_text() == f"{os.getpid()}\n"
    again.close()


@pytest.mark.parametrize("exchange", [True, False])
def test_the_swap_replaces_the_index_whole_and_deletes_the_old(tmp_path, monkeypatch, exchange):
    final, staged = tmp_path / "index", tmp_path / ".index.rebuild"
    final.mkdir()
    (final / MANIFEST).write_text("old")
    staged.mkdir()
    (staged / MANIFEST).write_text("new")
    if not exchange:
        monkeypatch.setattr(lock, "exchange_paths", lambda first, second: False)
    lock.swap_into_place(staged, final)
    assert (final / MANIFEST).read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["index"]  # neither the staging nor the old index


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux's")
def test_exchange_paths_swaps_two_folders_relative_or_absolute(tmp_path, monkeypatch):
    first, second = tmp_path / "a", tmp_path / "b"
    first.mkdir()
    second.mkdir()
    (first / "x").write_text("1")
    (second / "y").write_text("2")
    assert lock.exchange_paths(first, second)
    assert [p.name for p in first.iterdir()] == ["y"] and [p.name for p in second.iterdir()] == ["x"]
    monkeypatch.chdir(tmp_path)  # relative paths resolve against the working folder (AT_FDCWD)
    assert lock.exchange_paths(Path("a"), Path("b"))
    assert [p.name for p in first.iterdir()] == ["x"]
    assert not lock.exchange_paths(first, tmp_path / "missing")


@pytest.mark.parametrize("libc", [SimpleNamespace(), OSError("no libc")])
def test_without_renameat2_the_exchange_says_so(monkeypatch, tmp_path, libc):
    def cdll(name, use_errno=False):
        if isinstance(libc, Exception):
            raise libc
        return libc

    monkeypatch.setattr("ctypes.CDLL", cdll)
    assert lock.exchange_paths(tmp_path, tmp_path) is False


def test_a_failed_delete_of_the_old_index_never_fails_the_swap(tmp_path, monkeypatch):
    final, staged = tmp_path / "index", tmp_path / ".index.rebuild"
    for folder, text in ((final, "old"), (staged, "new")):
        folder.mkdir()
        (folder / MANIFEST).write_text(text)

    def busy(path, ignore_errors=False):
        if not ignore_errors:
            raise OSError("device busy")

    monkeypatch.setattr(lock.shutil, "rmtree", busy)
    lock.swap_into_place(staged, final)
    assert (final / MANIFEST).read_text() == "new"
    retired = tmp_path / ".index.old-1"
    retired.mkdir()
    (retired / MANIFEST).write_text("{}")
    monkeypatch.setattr(lock, "pid_alive", lambda pid: False)
    assert lock.clean_retired(final) == []


def test_pid_alive(dead_pid, monkeypatch):
    assert not lock.pid_alive(os.getpid())  # our own pid in a leftover is a recycled pid's
    assert not lock.pid_alive(dead_pid)
    assert lock.pid_alive(os.getppid())
    signals = []

    def not_ours(pid, signal):
        signals.append(signal)
        raise PermissionError("another user's process")

    monkeypatch.setattr(lock.os, "kill", not_ours)
    assert lock.pid_alive(12345) and signals == [0]  # probed with signal 0 (nothing sent), someone else's: alive


def test_only_leftovers_whose_writer_is_gone_are_removed(tmp_path, dead_pid, caplog):
    live = os.getppid()
    dead_tmp = tmp_path / f".clip.f16.{dead_pid}.ab12.tmp"
    live_tmp = tmp_path / f".clip.f16.{live}.cd34.tmp"
    user = tmp_path / f"clip.f16.{dead_pid}.ab12.tmp"  # no leading dot: not our name pattern
    folder_tmp = tmp_path / f".x.{dead_pid}.ef56.tmp"
    for path in (dead_tmp, live_tmp, user):
        path.write_text("x")
    folder_tmp.mkdir()
    with caplog.at_level("WARNING", logger="img2prompt.index.lock"):
        assert lock.clean_temp_files(tmp_path, tmp_path / "absent") == [live_tmp]
    assert f"1 temp file(s) belong to processes still running (pid {live})" in caplog.text
    assert not dead_tmp.exists() and live_tmp.exists() and user.exists() and folder_tmp.is_dir()
    assert lock.is_own_leftover(tmp_path / LOCK) and lock.is_own_leftover(live_tmp)
    assert not lock.is_own_leftover(user) and not lock.is_own_leftover(folder_tmp)
    assert not lock.only_own_leftovers(tmp_path)
    user.unlink()
    folder_tmp.rmdir()
    (tmp_path / LOCK).write_text("1\n")
    assert lock.only_own_leftovers(tmp_path)


def test_retired_indexes_are_removed_only_when_their_swap_is_gone(tmp_path, dead_pid, caplog):
    final = tmp_path / "index"
    live = os.getppid()
    gone, running, empty = (tmp_path / f".index.old-{dead_pid}", tmp_path / f".index.old-{live}",
                            tmp_path / f".index.old-{dead_pid + 1}")
    other = tmp_path / f".other.old-{dead_pid}"
    for path in (gone, running, other):
        path.mkdir()
        (path / MANIFEST).write_text("{}")
    empty.mkdir()
    with caplog.at_level("WARNING", logger="img2prompt.index.lock"):
        assert sorted(lock.clean_retired(final)) == sorted([running, empty])
    assert f"the build swapping it out (pid {live}) still runs" in caplog.text
    assert not gone.exists() and running.exists() and empty.exists() and other.exists()
    assert lock.clean_retired(tmp_path / "nowhere" / "index") == []


def test_every_dead_temp_file_is_removed_among_other_files(tmp_path, dead_pid):
    dead = [tmp_path / f".f{n}.{dead_pid}.ab{n:02d}.tmp" for n in range(20)]
    others = [tmp_path / f"user-{n}.txt" for n in range(20)]
    for path in dead + others:
        path.write_text("x")
    assert lock.clean_temp_files(tmp_path) == []
    assert not any(path.exists() for path in dead) and all(path.exists() for path in others)


def test_a_temp_file_another_cleaner_removed_first_is_no_error(tmp_path, monkeypatch):
    path = tmp_path / ".clip.f16.4242.ab12.tmp"
    path.write_text("x")

    def gone_meanwhile(pid):
        path.unlink()
        return False

    monkeypatch.setattr(lock, "pid_alive", gone_meanwhile)
    assert lock.clean_temp_files(tmp_path) == [] and not path.exists()


def test_the_lock_folder_is_made_with_its_parents(tmp_path):
    handle = lock.lock_folder(tmp_path / "a" / "b" / "out")
    handle.close()
    assert (tmp_path / "a" / "b" / "out" / LOCK).is_file()


def test_a_missing_folder_does_not_stop_the_cleaning_of_the_next(tmp_path, dead_pid):
    dead = tmp_path / f".clip.f16.{dead_pid}.ab12.tmp"
    dead.write_text("x")
    assert lock.clean_temp_files(tmp_path / "absent", tmp_path) == [] and not dead.exists()
