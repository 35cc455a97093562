"""Memory of `interrogate` over a folder: does the peak grow with the folder? (issue #33 item 1)

Runs query/folder_job.run_folder_job (the walk, the chunks, the CSV rows through the temp file) over N empty
`.png` files with a stand-in interrogator that allocates what a real chunk holds (CLIP ViT-L image vectors,
256 x 768 float32 = 0.75 MiB) and returns 300-character prompts. Python's tracemalloc peak for N and 10 N
images; the part that grows is the path list (a str per image), the rest is one chunk.

    python bench/folder_memory.py --images 2560
"""
from __future__ import annotations

import argparse
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np

from img2prompt.query.folder_job import FolderJob, run_folder_job
from img2prompt.query.interrogate import Interrogation

DIM = 768


def fake_interrogate(paths: list[str]) -> list[Interrogation]:
    vectors = np.ones((len(paths), DIM), dtype=np.float32)  # what the encoder holds for a chunk
    return [Interrogation(path, "a castle on a hill, " * 15, "a castle", row, float(vectors[row, 0]))
            for row, path in enumerate(paths)]


def peak_for(count: int, root: Path) -> tuple[int, int]:
    folder = root / f"n{count}"
    folder.mkdir()
    for number in range(count):
        (folder / f"{number:07d}.png").touch()
    tracemalloc.start()
    report = run_folder_job(FolderJob([str(folder)], out=str(root / f"n{count}.csv")), fake_interrogate)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert report.rows == count
    return peak, (root / f"n{count}.csv").stat().st_size


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=2560)
    args = parser.parse_args()
    chunk_vectors = 256 * DIM * 4
    with tempfile.TemporaryDirectory() as tmp:
        rows = []
        for count in (args.images, args.images * 10):
            peak, size = peak_for(count, Path(tmp))
            rows.append((count, peak, size))
            print(f"{count:>8} images: peak {peak / 2**20:7.2f} MiB traced (= {peak / chunk_vectors:5.1f} chunks' "
                  f"vectors), output {size / 2**20:7.2f} MiB")
    (small, small_peak, small_size), (big, big_peak, big_size) = rows
    print(f"10x the images: peak x{big_peak / small_peak:.2f}, output file x{big_size / small_size:.2f}; "
          f"growth per extra image {(big_peak - small_peak) / (big - small):.0f} B (the path list)")


if __name__ == "__main__":
    main()
