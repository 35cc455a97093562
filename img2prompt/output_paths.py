"""Refuse, before any work, an output that would destroy or corrupt something the user pointed at.

One check for every command that writes: each output (with the side files it also writes, e.g. --save-npy's
NAME.ids.txt) must be a file in an existing folder, must not be an input file, must not be another output
(or another output's side file), and must not lie inside an input folder (images, an index) or inside any
index folder. Files are compared as the file system sees them: symlinks followed, hard links and
case-insensitive names (macOS, Windows) caught by comparing inodes.

What makes a folder an index is the index format's to say (index/manifest.py's `is_index_folder`): this
module sits below index/, so the callers pass that test in.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Mapping

from img2prompt.errors import UserError

PathLike = str | os.PathLike


@dataclass(frozen=True)
class Output:
    """One output flag: its main file and the side files written with it, each with how to name it."""
    flag: str
    path: PathLike | None  # None: the flag is unused
    side_files: tuple[tuple[str, PathLike], ...] = ()  # (description, path), e.g. ("id list", P.ids.txt)

    def files(self) -> list[tuple[str, Path]]:
        """(who writes it, path) of the main file and each side file."""
        return [(self.flag, Path(self.path))] + [(f"{self.flag}'s {what}", Path(path))
                                                 for what, path in self.side_files]


def _identity(path: Path) -> tuple:
    """What makes two names the same file here: the inode of an existing file, else (the folder's inode,
    the name as that folder compares names)."""
    try:
        stat = path.stat()  # follows symlinks; on a case-insensitive folder finds `Out.csv` for `out.csv`
        return ("file", stat.st_dev, stat.st_ino)
    except OSError:
        pass
    parent = Path(os.path.realpath(path.parent))
    try:
        stat = parent.stat()
    except OSError:
        return ("path", os.path.realpath(path))
    name = path.name.casefold() if _case_insensitive(parent) else path.name
    return ("new", stat.st_dev, stat.st_ino, name)


def _case_insensitive(folder: Path) -> bool:
    """Whether `folder`'s file system ignores case: the nearest folder name with letters, case swapped,
    is the same folder. (Unknown, e.g. no letters up to the root: treated as case-sensitive.)"""
    for current in (folder, *folder.parents):
        swapped = current.name.swapcase()
        if swapped != current.name:
            other = current.with_name(swapped)
            try:
                return os.path.samefile(current, other)
            except OSError:
                return False
    return False


def _folder_identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = path.stat()
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)


def check_outputs(outputs: Iterable[Output], inputs: Mapping[str, PathLike | Iterable[PathLike] | None], *,
                  is_index: Callable[[Path], bool]) -> None:
    """Raise UserError (one line) for the first output that cannot be written safely; see the module note.

    `inputs` maps an input's name (its flag, or e.g. "INDEX_DIR") to a file or folder (or several; None =
    unused). Folders given as inputs protect everything under them, and so does every folder `is_index`
    says is an index (index/manifest.py's `is_index_folder`)."""
    input_files: list[tuple[str, tuple]] = []
    input_folders: list[tuple[str, tuple[int, int]]] = []
    for name, value in inputs.items():
        values = [value] if isinstance(value, (str, os.PathLike)) else list(value or [])
        for path in map(Path, values):
            if path.is_dir():
                identity = _folder_identity(path)
                if identity is not None:
                    input_folders.append((f"{name} {path}", identity))
            else:
                input_files.append((name, _identity(path)))
    seen: dict[tuple, str] = {}
    for output in outputs:
        if output.path is None:
            continue
        for who, path in output.files():
            _check_one(who, path, seen, input_files, input_folders, is_index)


def _check_one(who: str, path: Path, seen: dict[tuple, str], input_files: list[tuple[str, tuple]],
               input_folders: list[tuple[str, tuple[int, int]]], is_index: Callable[[Path], bool]) -> None:
    if path.is_dir():
        raise UserError(f"{who} {path} is a folder: give a file path")
    if not path.parent.is_dir():
        raise UserError(f"{who} {path}: the folder {path.parent} does not exist")
    identity = _identity(path)
    if identity in seen:
        raise UserError(f"{who} and {seen[identity]} name the same file {path}: give each output its own path")
    for input_label, input_identity in input_files:
        if identity == input_identity:
            raise UserError(f"{who} {path} would overwrite the {input_label} input")
    folder = Path(os.path.realpath(path.parent))
    for ancestor in (folder, *folder.parents):
        ancestor_identity = _folder_identity(ancestor)
        for input_label, input_identity in input_folders:
            if ancestor_identity == input_identity:
                raise UserError(f"{who} {path} lies inside the {input_label} input folder: write it elsewhere")
        if is_index(ancestor):
            raise UserError(f"{who} {path} lies inside the index folder {ancestor}: write it elsewhere")
    seen[identity] = who
