"""`interrogate` over folders: walk the inputs, skip what a resumed run already did, interrogate the rest in
bounded chunks and send each result where it goes (the rows file, a `.txt` beside the image, an echo) as it comes.

Memory stays flat in the folder's size: only the image paths and the done set are held; each chunk's vectors
are dropped before the next one is encoded.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from img2prompt.errors import UserError
from img2prompt.progress import progress_bar
from img2prompt.query.image_walk import walk_images
from img2prompt.query.interrogate import DEFAULT_MODIFIERS, Interrogation
from img2prompt.query.prompt_output import open_rows, output_format, read_rows, row_of, txt_path, write_txt

log = logging.getLogger(__name__)
CHUNK = 256  # images per encoding call: what bounds the memory of a folder of any size


@dataclass
class FolderJob:
    inputs: list[str]
    recursive: bool = False
    out: str | None = None  # .csv or .jsonl
    txt: bool = False  # IMAGE.txt beside each image
    overwrite_txt: bool = False
    resume: bool = False  # skip images already in `out` (and, with txt, whose .txt exists)
    modifiers: int = DEFAULT_MODIFIERS
    chunk: int = CHUNK
    progress: bool = False

    def check(self) -> None:
        """Every refusal the arguments allow, before any file is walked or model loaded."""
        if self.modifiers < 0:
            raise UserError(f"--modifiers must be 0 or more (got {self.modifiers})")
        if self.chunk < 1:
            raise UserError(f"chunk must be at least 1 (got {self.chunk})")
        if self.out is not None:
            output_format(self.out)
        if self.resume and self.out is None and not self.txt:
            raise UserError("--resume needs --out FILE or --txt (what it resumes)")
        if self.overwrite_txt and not self.txt:
            raise UserError("--overwrite-txt needs --txt")


@dataclass
class FolderReport:
    images: int  # images found in the inputs
    interrogated: int = 0  # encoded by this run
    resumed: int = 0  # skipped: done by an earlier run (--resume)
    failed: dict[str, str] = field(default_factory=dict)  # image → reason (corrupt, unreadable)
    txt_written: int = 0
    txt_kept: int = 0  # an existing .txt left as it was (no --overwrite-txt)
    not_images: int = 0  # files in the folders without an image suffix
    subfolders: int = 0  # folders not entered (no --recursive)
    out: str | None = None
    rows: int = 0  # rows in `out` after the run (kept + new)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float | None:
        return round(self.interrogated / self.seconds, 2) if self.seconds > 0 and self.interrogated else None


def _done(job: FolderJob, paths: list[str]) -> set[str]:
    """The images a resumed run skips: in the old rows file (when there is one) and with a .txt (when asked)."""
    if not job.resume:
        return set()
    in_rows = {row["image"] for row in read_rows(job.out)} if job.out else None
    return {path for path in paths
            if (in_rows is None or path in in_rows) and (not job.txt or txt_path(path).exists())}


def run_folder_job(job: FolderJob, interrogate: Callable[[list[str]], list[Interrogation]],
                   echo: Callable[[Interrogation], None] | None = None,
                   prepare: Callable[[], object] | None = None) -> FolderReport:
    """Interrogate every image of `job.inputs` with `interrogate` (a list of paths → its results, in order).
    prepare: called once the inputs are checked and before the clock starts (loading the models), so that the
    rate is the encoding's and no model log line cuts through the progress bar."""
    job.check()
    walk = walk_images(job.inputs, job.recursive)
    report = FolderReport(images=len(walk.paths), not_images=walk.not_images, subfolders=walk.subfolders,
                          out=job.out)
    done = _done(job, walk.paths)
    todo = [path for path in walk.paths if path not in done]
    report.resumed = len(walk.paths) - len(todo)
    old_rows = set()
    keep: Iterable[dict] = ()
    if job.resume and job.out:
        old_rows = {row["image"] for row in read_rows(job.out)}
        keep = read_rows(job.out)  # streamed into the new file, not held
    if prepare is not None and todo:
        prepare()
    started = time.perf_counter()
    rows = open_rows(job.out, keep) if job.out else contextlib.nullcontext()
    with rows as writer, progress_bar(enabled=job.progress, total=len(todo), unit="img", desc="interrogate") as bar:
        for start in range(0, len(todo), job.chunk):
            for result in interrogate(todo[start:start + job.chunk]):
                _deliver(job, report, result, writer, result.query not in old_rows, echo)
            bar.update(min(job.chunk, len(todo) - start))
        if writer is not None:
            report.rows = writer.rows
    report.seconds = time.perf_counter() - started
    return report


def _deliver(job: FolderJob, report: FolderReport, result: Interrogation, writer, new_row: bool,
             echo: Callable[[Interrogation], None] | None) -> None:
    """One result to each place it goes; a failed image is counted and logged once, in one line."""
    if echo is not None:
        echo(result)
    if result.error is not None:
        report.failed[result.query] = result.error
        return
    report.interrogated += 1
    if writer is not None and new_row:
        writer.write(row_of(result))
    if job.txt:
        if write_txt(result.query, result.prompt, job.overwrite_txt):
            report.txt_written += 1
        else:
            report.txt_kept += 1
