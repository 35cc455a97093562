"""interrogate over folders (issue 33 item 1): walking, csv/jsonl rows, .txt beside images, --resume, atomic output."""
from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import img2prompt
from conftest import run_cli
from img2prompt.errors import UserError
from img2prompt.query.image_walk import walk_images


@pytest.fixture()
def photos(tmp_path, sample_images) -> Path:
    """photos/: 2 images, a corrupt .png, a notes file; photos/sub/: 2 images; photos/sub/deeper/: 1 image."""
    root = tmp_path / "photos"
    (root / "sub" / "deeper").mkdir(parents=True)
    images = sorted(sample_images.iterdir())
    shutil.copy(images[0], root / "a.png")
    Image.open(images[1]).convert("RGB").save(root / "b.jpg")
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really a png")
    (root / "notes.md").write_text("not an image")
    (root / "old.txt").write_text("a caption: expected beside images, not counted as left out")
    shutil.copy(images[2], root / "sub" / "c.png")
    shutil.copy(images[3], root / "sub" / "d.png")
    shutil.copy(images[0], root / "sub" / "deeper" / "e.png")
    return root


@pytest.fixture()
def counted(monkeypatch):
    """How many images reach the encoder (monkeypatched seam of Img2PromptIndex.interrogate)."""
    import img2prompt.query.opened_index as opened_index

    seen = []
    real = opened_index.embed_images

    def counting(clip, images, *args, **kwargs):
        seen.extend(map(str, images))
        return real(clip, images, *args, **kwargs)

    monkeypatch.setattr(opened_index, "embed_images", counting)
    return seen


def test_walk_files_and_folders_recursive_or_not(photos):
    flat = walk_images([photos])
    assert [Path(p).name for p in flat.paths] == ["a.png", "b.jpg", "broken.png"]
    assert (flat.not_images, flat.subfolders) == (1, 1)
    deep = walk_images([photos, photos / "a.png"], recursive=True)  # a.png reached twice: kept once
    assert [Path(p).relative_to(photos).as_posix() for p in deep.paths] == [
        "a.png", "b.jpg", "broken.png", "sub/c.png", "sub/d.png", "sub/deeper/e.png"]
    with pytest.raises(UserError, match="image not found: .*nope"):
        walk_images([photos, photos / "nope"])
    with pytest.raises(UserError, match="no images .*--recursive"):
        walk_images([_only_subfolders(photos)])


def _only_subfolders(photos: Path) -> Path:
    top = photos.parent / "top"
    (top / "inner").mkdir(parents=True)
    shutil.copy(photos / "a.png", top / "inner" / "x.png")
    return top


def test_chunks_are_bounded_and_rows_stream(photos, tmp_path):
    """A fake interrogator: each call gets at most `chunk` images, and every row is in the file at the end."""
    from img2prompt.query.folder_job import FolderJob, run_folder_job
    from img2prompt.query.interrogate import Interrogation

    calls = []

    def fake(paths):
        calls.append(len(paths))
        return [Interrogation(p, f"prompt of {Path(p).name}", "base", 7, 0.5) for p in paths]

    report = run_folder_job(FolderJob([str(photos)], recursive=True, out=str(tmp_path / "p.csv"), chunk=4), fake)
    assert calls == [4, 2] and report.rows == 6
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    assert rows[-1] == {"image": str(photos / "sub/deeper/e.png"), "prompt": "prompt of e.png",
                        "best_neighbour": "base", "best_neighbour_id": "7", "score": "0.5"}


def test_csv_and_jsonl_rows_hold_the_interrogation(built_index, photos, tmp_path, counted):
    with img2prompt.open_index(built_index, device="cpu") as index:
        report = index.interrogate_folder(photos, recursive=True, out=tmp_path / "p.csv")
        again = index.interrogate_folder([photos], recursive=True, out=tmp_path / "p.jsonl")
        direct = {r.query: r for r in index.interrogate([str(photos / "a.png"), str(photos / "sub/deeper/e.png")])}
    assert report.images == 6 and report.interrogated == 5 and report.rows == 5
    assert list(report.failed) == [str(photos / "broken.png")]
    rows = list(csv.DictReader(open(tmp_path / "p.csv", encoding="utf-8")))
    lines = [json.loads(line) for line in (tmp_path / "p.jsonl").read_text("utf-8").splitlines()]
    assert [row["image"] for row in rows] == [line["image"] for line in lines] == [
        str(photos / name) for name in ("a.png", "b.jpg", "sub/c.png", "sub/d.png", "sub/deeper/e.png")]
    for row, line in zip(rows, lines):
        assert row["prompt"] == line["prompt"] and row["best_neighbour"] == line["best_neighbour"]
        assert float(row["score"]) == pytest.approx(line["score"]) and int(row["best_neighbour_id"]) == line["best_neighbour_id"]
    for image, result in direct.items():
        line = next(line for line in lines if line["image"] == image)
        assert line["prompt"] == result.prompt and line["best_neighbour"] == result.base
        assert line["best_neighbour_id"] == result.base_id and line["score"] == pytest.approx(result.base_score, abs=1e-6)
    assert len(counted) == 14  # 6 per folder run (the corrupt one reaches the decoder and fails there) + 2


def test_txt_beside_images_never_overwrites(built_index, photos, counted):
    (photos / "a.txt").write_text("my own caption\n")
    with img2prompt.open_index(built_index, device="cpu") as index:
        report = index.interrogate_folder(photos, txt=True)
        assert (photos / "a.txt").read_text() == "my own caption\n"
        assert (report.txt_written, report.txt_kept, len(report.failed)) == (1, 1, 1)
        prompt = index.interrogate([str(photos / "b.jpg")])[0].prompt
        assert (photos / "b.txt").read_text("utf-8") == prompt + "\n"
        assert not (photos / "broken.txt").exists() and not (photos / "sub" / "c.txt").exists()
        report = index.interrogate_folder(photos, txt=True, overwrite_txt=True)
    assert (report.txt_written, report.txt_kept) == (2, 0)
    assert (photos / "a.txt").read_text("utf-8") != "my own caption\n"


def test_resume_skips_what_is_done_and_keeps_old_rows(built_index, photos, tmp_path, counted):
    out = tmp_path / "p.jsonl"
    with img2prompt.open_index(built_index, device="cpu") as index:
        first = index.interrogate_folder(photos, out=out)  # top level only: a, b (+ broken)
        counted.clear()
        second = index.interrogate_folder(photos, recursive=True, out=out, resume=True)
        assert sorted(Path(p).name for p in counted) == ["broken.png", "c.png", "d.png", "e.png"]
        assert (second.resumed, second.interrogated, second.rows) == (2, 3, 5)
        counted.clear()
        third = index.interrogate_folder(photos, recursive=True, out=out, resume=True, txt=True)
    assert first.rows == 2
    images = [json.loads(line)["image"] for line in out.read_text("utf-8").splitlines()]
    assert len(images) == len(set(images)) == 5  # the old rows once, then the new ones
    assert len(counted) == 6 and third.rows == 5  # no .txt yet: all redone for their .txt, no row twice
    counted.clear()
    with img2prompt.open_index(built_index, device="cpu") as index:
        fourth = index.interrogate_folder(photos, recursive=True, txt=True, resume=True)
    assert counted == [str(photos / "broken.png")] and fourth.resumed == 5


def test_a_failure_mid_run_leaves_the_old_output(built_index, photos, tmp_path, monkeypatch):
    import img2prompt.query.folder_job as folder_job

    out = tmp_path / "p.csv"
    out.write_text("image,prompt\nold.png,an old row\n")
    calls = []
    real = folder_job._deliver

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # a kill mid-run
        return real(*args, **kwargs)

    monkeypatch.setattr(folder_job, "_deliver", failing)
    with img2prompt.open_index(built_index, device="cpu") as index:
        with pytest.raises(KeyboardInterrupt):
            index.interrogate_folder(photos, recursive=True, out=out, resume=True)
    assert out.read_text() == "image,prompt\nold.png,an old row\n"
    assert [p.name for p in tmp_path.iterdir()] == ["p.csv", "photos"]  # no temp file left


def test_bad_arguments_are_refused_before_work(built_index, photos, tmp_path, counted):
    with img2prompt.open_index(built_index, device="cpu") as index:
        with pytest.raises(UserError, match=r"--out p.txt: name a .csv or .jsonl"):
            index.interrogate_folder(photos, out="p.txt")
        with pytest.raises(UserError, match="--resume needs --out FILE or --txt"):
            index.interrogate_folder(photos, resume=True)
        with pytest.raises(UserError, match="image not found"):
            index.interrogate_folder([photos / "a.png", photos / "missing.png"])
    assert counted == []


@pytest.mark.slow
def test_cli_folder_and_json(built_index, photos, tmp_path, tiny_clip_dir):
    ran = run_cli("interrogate", built_index, photos, photos / "sub" / "c.png", "--json", "-q")
    assert ran.returncode == 0, ran.stderr
    entries = json.loads(ran.stdout)
    assert [Path(e["query"]).name for e in entries] == ["a.png", "b.jpg", "broken.png", "c.png"]
    assert "error" in entries[2] and "1 image(s) failed" in ran.stderr and "1 subfolder(s)" in ran.stderr
    ran = run_cli("interrogate", built_index, photos, "-r", "--out", tmp_path / "p.csv", "--txt", "-q")
    assert ran.returncode == 0, ran.stderr
    assert "interrogated 5 of 6 images" in ran.stdout and "wrote" in ran.stdout and "failed" in ran.stdout
    assert (photos / "sub" / "deeper" / "e.txt").is_file()
    ran = run_cli("interrogate", built_index, photos, "--out", tmp_path / "p.txt")
    assert ran.returncode == 2 and ran.stderr.count("\n") == 1 and ".csv or .jsonl" in ran.stderr
    ran = run_cli("search", built_index, "--image", photos / "sub", "--k", "2", "--json")
    assert ran.returncode == 0, ran.stderr
    assert [Path(e["query"]).name for e in json.loads(ran.stdout)] == ["c.png", "d.png"]
