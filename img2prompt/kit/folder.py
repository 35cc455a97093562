"""Where a kit is written: which existing folder may be replaced, the swap, and what killed runs left behind.

A kit is built in KIT.tmp-<pid> beside KIT and swapped in at the end (the old kit moves to KIT.old-<pid>,
the new one to KIT, then the old one is deleted), so a failed or killed build never costs the old kit. The swap
and the scan for dead runs' folders are the index's (index/lock.py); what to do with each folder is the kit's.
Only a kit (a folder with a readable kit.json) or an empty folder is ever replaced: --overwrite must not
empty a folder of someone's own files because it was named by mistake.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

from img2prompt.errors import UserError
from img2prompt.index.lock import leftovers_beside, swap_into_place as index_swap
from img2prompt.kit.files import KIT_MARKER

log = logging.getLogger(__name__)


def is_kit(folder: Path) -> bool:
    """Whether `folder` holds a kit: its kit.json reads as a kit's (a JSON object with a format)."""
    try:
        info = json.loads((folder / KIT_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(info, dict) and "format" in info


def check_out_folder(out: Path, shown: str, overwrite: bool) -> None:
    """Refuse an --out that may not be written: a file, a folder that is not a kit, a kit without --overwrite."""
    if not out.exists():
        return
    if not out.is_dir():
        raise UserError(f"--out {shown} is a file, not a folder")
    if not (is_kit(out) or not any(out.iterdir())):
        raise UserError(f"{shown} already exists and is not a kit (no readable {KIT_MARKER}): --overwrite replaces "
                        "only a kit folder; choose another --out")
    if not overwrite:
        raise UserError(f"{shown} already exists: pass --overwrite to replace it")


def temp_folder(out: Path, kind: str, pid: int | None = None) -> Path:
    """KIT.tmp-<pid> (a kit being built) or KIT.old-<pid> (the kit being replaced), beside KIT."""
    return out.with_name(f"{out.name}.{kind}-{os.getpid() if pid is None else pid}")


def clean_leftovers(out: Path) -> list[str]:
    """Deal with KIT.tmp-<pid> / KIT.old-<pid> folders of runs that died; returns one note per folder.

    A dead run's temp build is deleted; its KIT.old-<pid> is deleted when KIT exists (the swap finished), and
    renamed back to KIT when KIT is missing (the run died between the two renames: it is the only kit). A
    folder of a live process is reported and left alone (another kaggle-kit may be writing it)."""
    found = leftovers_beside(out, re.escape(out.name) + r"\.(?P<kind>tmp|old)-(?P<pid>\d+)")
    notes = []
    # old kits first: one may have to be restored
    for path, match, alive in sorted(found, key=lambda item: (item[1]["kind"] != "old", item[0].name)):
        pid = int(match["pid"])
        if alive:
            notes.append(f"{path} belongs to running process {pid} (another kaggle-kit?): left alone")
        elif match["kind"] == "old" and not out.exists() and is_kit(path):
            os.rename(path, out)
            notes.append(f"restored {out} from {path.name}, left by a run killed while it swapped kits")
        else:
            try:
                shutil.rmtree(path)
                notes.append(f"removed {path}, left by a killed run (pid {pid})")
            except OSError as exc:
                notes.append(f"{path}, left by a killed run (pid {pid}), could not be removed ({exc}): delete it")
    for note in notes:
        log.warning("%s", note)
    return notes


def swap_into_place(tmp: Path, out: Path) -> None:
    """Move the finished kit `tmp` to `out`; an old kit there is removed only once the new one is in place."""
    if out.exists() and not (is_kit(out) or not any(out.iterdir())):  # filled with something else meanwhile
        raise UserError(f"{out} is no longer a kit (no readable {KIT_MARKER}): not replaced")
    # Two renames through KIT.old-<pid> (a kill between them: clean_leftovers restores it), as the kit always did
    index_swap(tmp, out, retired=temp_folder(out, "old"), exchange=False)
