"""The manifest: reading it, its schema, and the key ranges it describes.

A complete manifest is checked field by field when an index opens (validate_complete): a damaged or
hand-edited manifest is one line naming the field, never a KeyError or a wrong answer later. Formats 1–3
all pass: format 1 names its backend "faiss" (not "search"); formats 1–2 have no key_ranges (one text
range over every row).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from img2prompt.errors import UserError
from img2prompt.index.layout import (CLIP_VECTORS, INDEX_FILES, KEY_KINDS, KEY_PCA, MANIFEST, MINILM,
                                     PHRASE_VECTORS, PHRASES, PROMPTS, REGRESSION, TEXT_KEYS)
from img2prompt.index.minilm_store import FP16, MINILM_DTYPES, minilm_dtype, minilm_file_names


def is_index_folder(folder: Path) -> bool:
    """A folder holding an img2prompt manifest (one with a format_version, or one that cannot be parsed:
    a damaged index is still an index to protect)."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return False
    try:
        payload = json.loads(manifest.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return True
    return not isinstance(payload, dict) or "format_version" in payload


def read_manifest(root: Path) -> dict | None:
    """The folder's manifest as a dict, None when there is none; unreadable JSON is a UserError."""
    path = Path(root) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: manifest is not valid JSON ({exc})") from exc
    except OSError as exc:
        raise UserError(f"{path}: manifest is not readable ({exc.strerror or exc})") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"{path}: manifest holds a JSON {type(manifest).__name__}, not an object: the index is "
                        "damaged, rebuild it")
    return manifest


@dataclass(frozen=True)
class KeyRange:
    """Rows [start, stop) of one key kind, with the search backend that covers them."""
    keys: str  # TEXT_KEYS or IMAGE_KEYS
    start: int
    stop: int
    plan: dict  # {"kind", "params", "recall_at_10", ...}
    folder: str = ""  # where the backend's own files live, relative to the index folder

    @property
    def count(self) -> int:
        return self.stop - self.start

    def as_dict(self) -> dict:
        return {"keys": self.keys, "rows": [self.start, self.stop], "folder": self.folder, "search": self.plan}

    @classmethod
    def from_dict(cls, entry: dict) -> "KeyRange":
        start, stop = entry["rows"]
        return cls(entry["keys"], int(start), int(stop), entry["search"], entry.get("folder", ""))


def content_sha256(manifest: dict) -> str:
    """What identifies a complete index's content: its file records (each file's bytes and sha256)."""
    import hashlib

    return hashlib.sha256(json.dumps(manifest.get("files", {}), sort_keys=True).encode()).hexdigest()


def search_plan(manifest: dict) -> dict:
    """The first key range's backend section (format 1 called it "faiss")."""
    return manifest.get("search") or manifest["faiss"]


def key_ranges(manifest: dict) -> list[KeyRange]:
    """The key kinds and where they lie; indexes before format 3 are one text range."""
    if "key_ranges" in manifest:
        return [KeyRange.from_dict(entry) for entry in manifest["key_ranges"]]
    return [KeyRange(TEXT_KEYS, 0, int(manifest["count"]), search_plan(manifest))]


# ---------------------------------------------------------------------------------------------- schema

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _is_fraction(value: Any) -> bool:
    return _is_number(value) and 0 <= value <= 1


def _is_optional(value: Any, kind: type | tuple) -> bool:
    return value is None or (isinstance(value, kind) and not isinstance(value, bool))


def is_relative_name(name: Any) -> bool:
    """A path inside the index folder: relative, no '..' (a manifest must never point the reader elsewhere)."""
    if not isinstance(name, str) or not name or "\\" in name or "\0" in name:
        return False
    path = PurePosixPath(name)
    return not path.is_absolute() and ".." not in path.parts



class _Problems(list):
    """The invalid fields found, each as 'field (what is wrong)'."""

    def need(self, ok: bool, field: str, value: Any = None, why: str = "") -> bool:
        if not ok:
            shown = why or (repr(value) if not isinstance(value, (dict, list)) else type(value).__name__)
            self.append(f"{field} {shown}" if shown else field)
        return ok


def _check_model(problems: _Problems, field: str, entry: Any) -> None:
    if not isinstance(entry, dict) or not _is_int(entry.get("dim")) or entry["dim"] <= 0 \
            or not isinstance(entry.get("sha256"), str) or not entry["sha256"]:
        problems.append(field)
        return
    for name in ("name", "pretrained"):  # add / merge / a kit load the models by them
        problems.need(isinstance(entry.get(name), str) or (name == "pretrained" and entry.get(name) is None)
                      or (name == "name" and "name" not in entry and field != "models.clip"),
                      f"{field}.{name}", entry.get(name))
    members = entry.get("members")
    if members is None:
        return
    if not isinstance(members, list) or not members or not all(
            isinstance(m, dict) and _is_int(m.get("dim")) and m["dim"] > 0 and isinstance(m.get("name"), str)
            and (m.get("pretrained") is None or isinstance(m["pretrained"], str)) for m in members):
        problems.append(f"{field}.members")
    elif sum(m["dim"] for m in members) != entry["dim"]:
        problems.append(f"{field}.members (dims add up to {sum(m['dim'] for m in members)}, not {entry['dim']})")


def _check_plan(problems: _Problems, field: str, plan: Any) -> None:
    from img2prompt.index.backend import BACKENDS

    if not problems.need(isinstance(plan, dict) and "kind" in plan, field):
        return
    problems.need(isinstance(plan["kind"], str) and plan["kind"] in BACKENDS, f"{field}.kind", plan["kind"])
    problems.need(isinstance(plan.get("params", {}), dict), f"{field}.params", plan.get("params"))
    recall = plan.get("recall_at_10")  # add compares its new measure with it
    if problems.need(recall is None or isinstance(recall, dict), f"{field}.recall_at_10", recall) and recall:
        problems.need(recall.get("recall") is None or _is_fraction(recall["recall"]), f"{field}.recall_at_10.recall",
                      recall.get("recall"))


def _check_files(problems: _Problems, files: Any, dtype: str = FP16) -> None:
    if not isinstance(files, dict) or not all(
            isinstance(record, dict) and _is_int(record.get("bytes")) for record in files.values()):
        problems.append("files")
        return
    for name, record in files.items():
        problems.need(is_relative_name(name), "files", name, f"name {name!r} (not a path inside the index)")
        problems.need(record["bytes"] >= 0, f"files.{name}.bytes", record["bytes"])
        problems.need(isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64,
                      f"files.{name}.sha256", record.get("sha256"))
    required = tuple(n for n in INDEX_FILES if n != MINILM) + minilm_file_names(dtype)
    for name in required:
        problems.need(name in files, f"files.{name}", why="(not listed)")
    if PHRASES in files:
        problems.need(PHRASE_VECTORS in files, f"files.{PHRASE_VECTORS}", why=f"(not listed beside {PHRASES})")


def _check_key_ranges(problems: _Problems, entries: Any, count: int) -> None:
    if not problems.need(isinstance(entries, list) and len(entries) > 0, "key_ranges", entries):
        return
    # a kind may come back in a later range: an index with image keys grown by add has ranges per add
    expected_start = 0
    for number, entry in enumerate(entries):
        field = f"key_ranges[{number}]"
        if not problems.need(isinstance(entry, dict), field, entry):
            return
        keys = entry.get("keys")
        problems.need(keys in KEY_KINDS, f"{field}.keys", keys)
        problems.need(is_relative_name(entry.get("folder")) or entry.get("folder", "") == "", f"{field}.folder",
                      entry.get("folder"))
        _check_plan(problems, f"{field}.search", entry.get("search"))
        rows = entry.get("rows")
        if not problems.need(isinstance(rows, list) and len(rows) == 2 and all(_is_int(r) for r in rows),
                             f"{field}.rows", rows, repr(rows)):
            return
        start, stop = rows
        if not problems.need(start == expected_start and start < stop <= count, f"{field}.rows", rows,
                             f"{rows} (expected rows from {expected_start} to at most the {count} prompts)"):
            return
        expected_start = stop
    problems.need(expected_start == count, "key_ranges", why=f"(cover rows 0–{expected_start}, the index has "
                                                              f"{count} prompts)")


def _check_segments(problems: _Problems, entries: Any, count: int, files: dict, dtype: str | None) -> None:
    """format 5: appended segments, numbered up, contiguous after the base rows, their files listed."""
    from img2prompt.index.segments import segment_folder

    if not problems.need(isinstance(entries, list) and len(entries) > 0, "segments", entries):
        return
    stop, number = None, 0
    for position, entry in enumerate(entries):
        field = f"segments[{position}]"
        fields = ("number", "first_id", "count")
        if not problems.need(isinstance(entry, dict) and all(_is_int(entry.get(k)) for k in fields), field, entry):
            return
        problems.need(entry["number"] > number and entry["count"] > 0 and entry["first_id"] > 0
                      and (stop is None or entry["first_id"] == stop), field, entry)
        number, stop = entry["number"], entry["first_id"] + entry["count"]
        names = (PROMPTS, CLIP_VECTORS) + minilm_file_names(dtype if dtype in MINILM_DTYPES else FP16)
        for name in names:
            problems.need(f"{segment_folder(entry['number'])}/{name}" in files,
                          f"files.{segment_folder(entry['number'])}/{name}", why="(not listed)")
    problems.need(stop == count, "segments", why=f"(end at row {stop}, the index has {count} prompts)")


def _check_calibration(problems: _Problems, calibration: Any) -> None:
    if not problems.need(isinstance(calibration, dict), "calibration", calibration):
        return
    problems.need(_is_int(calibration.get("seed", 0)), "calibration.seed", calibration.get("seed"))
    fits = calibration.get("fits", {})  # eval reports each fit's method
    problems.need(isinstance(fits, dict) and all(isinstance(fit, dict) for fit in fits.values()),
                  "calibration.fits", fits)
    maps = calibration.get("maps", {})
    if not problems.need(isinstance(maps, dict), "calibration.maps", maps):
        return
    for query_kind, by_key in maps.items():
        field = f"calibration.maps.{query_kind}"
        if not problems.need(query_kind in KEY_KINDS and isinstance(by_key, dict), field, by_key):
            continue
        for key_kind, entry in by_key.items():
            if not problems.need(key_kind in KEY_KINDS and isinstance(entry, dict), f"{field}.{key_kind}", entry):
                continue
            for name in ("scale", "offset"):
                problems.need(_is_number(entry.get(name)), f"{field}.{key_kind}.{name}", entry.get(name))


def _check_regression(problems: _Problems, info: Any) -> None:
    if not problems.need(isinstance(info, dict), "regression", info):
        return
    for name in ("key_dim", "target_dim"):
        problems.need(_is_int(info.get(name)) and info[name] > 0, f"regression.{name}", info.get(name))
    for name in ("lam", "ratio"):
        problems.need(_is_number(info.get(name)), f"regression.{name}", info.get(name))
    rows = info.get("rows")
    problems.need(isinstance(rows, dict) and all(k in KEY_KINDS and _is_int(v) and v >= 0 for k, v in rows.items()),
                  "regression.rows", rows)


def _check_key_pca(problems: _Problems, pca: Any, models: Any, files: dict) -> None:
    """--key-dims: 1 ≤ dims < the CLIP dim, key_dim that dim, its file listed; what add reads of the fit typed."""
    clip_dim = (models.get("clip") or {}).get("dim") if isinstance(models, dict) and isinstance(
        models.get("clip"), dict) else None
    problems.need(KEY_PCA in files, f"files.{KEY_PCA}", why="(not listed)")
    if not problems.need(isinstance(pca, dict), "key_pca", pca):
        return
    problems.need(_is_int(pca.get("dims")) and _is_int(clip_dim) and 1 <= pca["dims"] < clip_dim, "key_pca.dims",
                  pca.get("dims"))
    problems.need(pca.get("key_dim", clip_dim) == clip_dim, "key_pca.key_dim", pca.get("key_dim"))
    for name in ("seed", "fit_rows", "queries"):
        problems.need(_is_int(pca.get(name, 0)) and pca.get(name, 0) >= 0, f"key_pca.{name}", pca.get(name))
    problems.need(_is_fraction(pca.get("recall_at_10", 0)), "key_pca.recall_at_10", pca.get("recall_at_10"))


def _check_grown_sections(problems: _Problems, manifest: dict, files: dict) -> None:
    """The sections add and merge read and carry on (history, build_options, phrases.min_count, corpus, …):
    each absent or of the type they are read as."""
    history = manifest.get("history", [])
    problems.need(isinstance(history, list) and all(isinstance(entry, dict) for entry in history), "history",
                  history)
    options = manifest.get("build_options", {})
    if problems.need(isinstance(options, dict), "build_options", options):
        seed, memory = options.get("seed", 0), options.get("max_memory")
        problems.need(_is_int(seed) and seed >= 0, "build_options.seed", seed)
        problems.need(_is_optional(memory, int) and (memory is None or memory > 0), "build_options.max_memory",
                      memory)
    phrases = manifest.get("phrases", {})  # not a dict beside a phrase file: phrases.count says so
    if problems.need(isinstance(phrases, dict) or PHRASES in files, "phrases", phrases) \
            and isinstance(phrases, dict) and "min_count" in phrases:
        problems.need(_is_int(phrases["min_count"]) and phrases["min_count"] >= 1, "phrases.min_count",
                      phrases["min_count"])
    for name in ("corpus", "near_dup"):  # carried on by add (minilm and regression are checked above)
        problems.need(isinstance(manifest.get(name, {}), dict), name, manifest.get(name))
    for name in ("created_at", "metric"):
        problems.need(_is_optional(manifest.get(name), str), name, manifest.get(name))


def _check_phrase_count(problems: "_Problems", phrases: Any) -> None:
    problems.need(isinstance(phrases, dict) and _is_int(phrases.get("count")) and phrases["count"] >= 0,
                  "phrases.count", phrases.get("count") if isinstance(phrases, dict) else phrases)


def validate_complete(path: Path, manifest: dict) -> None:
    """Every field a reader relies on, with the right type and range: one UserError naming them."""
    problems = _Problems()
    count = manifest.get("count")
    if not problems.need(_is_int(count) and count >= 0, "count", count):
        count = None
    models = manifest.get("models")
    for kind in ("clip", "text"):
        _check_model(problems, f"models.{kind}", models.get(kind) if isinstance(models, dict) else None)
    files = manifest.get("files")
    dtype = minilm_dtype(manifest) if isinstance(manifest.get("minilm", {}), dict) else None
    problems.need(dtype in MINILM_DTYPES, "minilm.dtype", dtype)
    _check_files(problems, files, dtype if dtype in MINILM_DTYPES else FP16)
    files = files if isinstance(files, dict) else {}
    section = "faiss" if "search" not in manifest and "faiss" in manifest else "search"  # format 1: "faiss"
    _check_plan(problems, section, manifest.get(section))
    if "key_ranges" in manifest and count is not None:
        _check_key_ranges(problems, manifest["key_ranges"], count)
    if "segments" in manifest and count is not None:
        _check_segments(problems, manifest["segments"], count, files if isinstance(files, dict) else {}, dtype)
    if "calibration" in manifest:
        _check_calibration(problems, manifest["calibration"])
    if REGRESSION in files:
        _check_regression(problems, manifest.get("regression"))
    if PHRASES in files:
        _check_phrase_count(problems, manifest.get("phrases"))
    if "key_pca" in manifest:
        _check_key_pca(problems, manifest["key_pca"], models, files)
    _check_grown_sections(problems, manifest, files)
    if problems:
        raise UserError(f"{path}: manifest is damaged (missing or invalid: {', '.join(problems)}): rebuild the index")


def built_with_stand_in(manifest: dict) -> bool:
    """Whether the index's CLIP (or any member of its ensemble) was a random-weights stand-in
    (img2prompt.stand_in marks its config; the build records "stand_in": true in models.clip)."""
    clip = (manifest.get("models") or {}).get("clip") or {}
    if not isinstance(clip, dict):
        return False
    members = clip.get("members") if isinstance(clip.get("members"), list) else []
    return clip.get("stand_in") is True or any(isinstance(m, dict) and m.get("stand_in") is True for m in members)
