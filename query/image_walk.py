"""Image inputs as a user gives them: files and folders alike, folders walked (optionally recursively) for
files with an image suffix, in a stable order. Only paths are held, never pixels."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

from img2prompt.encoders.images import IMAGE_SUFFIXES
from img2prompt.errors import UserError

CAPTION_SUFFIX = ".txt"


@dataclass
class ImageWalk:
    paths: list[str]  # the images, files as given first-come, each folder's images sorted
    not_images: int = 0  # files in walked folders without an image suffix, .txt captions aside (counted)
    subfolders: int = 0  # folders not entered (no --recursive)
    given_dirs: list[str] = field(default_factory=list)


def _folder_images(folder: Path, recursive: bool, walk: ImageWalk) -> Iterator[str]:
    for entry in sorted(os.scandir(folder), key=lambda entry: entry.name):
        path = Path(entry.path)
        if entry.is_dir():
            if recursive:
                yield from _folder_images(path, recursive, walk)
            else:
                walk.subfolders += 1
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            yield str(path)
        elif path.suffix.lower() != CAPTION_SUFFIX:  # captions beside the images (--txt writes them) are expected
            walk.not_images += 1


def walk_images(inputs: Sequence[str | os.PathLike], recursive: bool = False) -> ImageWalk:
    """Every image named by `inputs` (image files, used whatever their suffix, and folders). A path that does not
    exist is refused in one line before any work; an image reached twice is kept once."""
    walk, seen = ImageWalk(paths=[]), set()
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            walk.given_dirs.append(str(path))
            found = _folder_images(path, recursive, walk)
        elif path.is_file():
            found = iter([str(path)])
        else:
            raise UserError(f"image not found: {given}")
        for image in found:
            if image not in seen:
                seen.add(image)
                walk.paths.append(image)
    if not walk.paths:
        where = ", ".join(map(str, inputs))
        raise UserError(f"no images ({'/'.join(IMAGE_SUFFIXES)}) in {where}"
                        + (" (subfolders are entered with --recursive)" if walk.subfolders else ""))
    return walk
