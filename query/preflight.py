"""What a query command can refuse from its arguments, the manifest and the file system, before torch or a
model loads (well under a second): the settings against the index, the outputs against the inputs, the
image paths. The query paths call the same functions again (cheap), so API callers get the same checks.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Sequence

from img2prompt.errors import UserError
from img2prompt.query.image_walk import walk_images
from img2prompt.storage import is_url
from img2prompt.index.reader import PromptIndex, open_index
from img2prompt.index.manifest import is_index_folder
from img2prompt.output_paths import Output, check_outputs
from img2prompt.query.settings import RetrievalSettings


def read_index(path: str | Path) -> PromptIndex:
    """The index's manifest and files, checked; no model, no torch. A URL is read from its checked local cache."""
    if is_url(path):
        from img2prompt.index.remote import fetch

        path = fetch(str(path))
    return open_index(path)


def npy_ids_path(npy: str | Path) -> Path:
    """The imgId list written beside --save-npy's array (row i of the array is line i)."""
    npy = Path(npy)
    return npy.with_name(npy.name.removesuffix(".npy") + ".ids.txt")


def check_submit_paths(index_root: str | Path | None, images: str, out: str, explain: str | None = None,
                       save_npy: str | None = None, sample_submission: str | None = None) -> None:
    """Every file submit writes (with --save-npy's id list) against the inputs and each other."""
    if save_npy is not None and not str(save_npy).endswith(".npy"):
        raise UserError(f"--save-npy {save_npy}: the file name must end in .npy")
    check_outputs([Output("--out", out), Output("--explain", explain),
                   Output("--save-npy", save_npy, (("id list", npy_ids_path(save_npy)),) if save_npy else ())],
                  {"--sample-submission": sample_submission, "IMAGES_DIR": images, "INDEX_DIR": index_root},
                  is_index=is_index_folder)
    if not Path(images).is_dir():
        raise UserError(f"images folder not found: {images}")
    if sample_submission is not None and not Path(sample_submission).is_file():
        raise UserError(f"--sample-submission {sample_submission}: file not found")


def check_eval_paths(index_root: str | Path | None, labels: str, images: str | None, out: str | None,
                     plot: str | None, sweep: bool, captions: dict[str, str]) -> None:
    """eval's outputs against every input (labels, captions, images, the index) and each other; --plot's needs."""
    if plot and not sweep:
        raise UserError("--plot draws the sweep: add --sweep")
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise UserError("--plot needs matplotlib, which is not installed: pip install 'img2prompt[eval]'")
    check_outputs([Output("--out", out), Output("--plot", plot)],
                  {"--labels": labels, **{f"--captions {name}": path for name, path in captions.items()},
                   "IMAGES_DIR": images, "INDEX_DIR": index_root}, is_index=is_index_folder)
    if not Path(labels).is_file():
        raise UserError(f"labels file not found: {labels}")
    if images is not None and not Path(images).is_dir():
        raise UserError(f"images folder not found: {images}")


def check_search_images(images: Sequence[str], recursive: bool = False) -> list[str]:
    """The image paths named by files and folders (walked, subfolders with `recursive`); a missing one is refused."""
    return walk_images(images, recursive).paths if images else []


def check_settings(index: PromptIndex | str | Path, settings: RetrievalSettings) -> PromptIndex:
    index = index if isinstance(index, PromptIndex) else read_index(index)
    settings.check_for(index)
    return index
