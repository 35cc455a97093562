"""An index on an object store (s3://, memory://, http(s)://, hf://, ...): publish a built folder, fetch one
into a local cache.

Publish protocol (there is no rename on an object store, so the commit point is one PUT of manifest.json):
  1. every file the index lists is uploaded under a fresh generation prefix, <url>/gen-<time>-<random>/<name>,
     never over a file the committed manifest points at;
  2. <url>/manifest.json is replaced (one PUT; on a local/file:// target a temp file renamed): it lists the
     files as in a local index and names their prefix in "generation" — this switches readers to the new index;
  3. only then the replaced index's files are deleted (its generation, or the plain top-level names of an
     index published before generations existed), and so are generations a killed publish left a day ago
     (a younger unreferenced one may be another publisher's upload in flight).
Killed anywhere, the store holds a manifest whose files are all there (the old index until step 2 lands, the
new one after), so a reader with a cold cache opens one complete index, never a mix. A manifest without
"generation" (the earlier layout) reads its files from the top of the prefix.

Reading needs local files (the shards are memmapped and faiss maps its file), so `fetch` copies the index into
<cache>/remote/index/<hash of url + manifest> and reuses it while every file still has its listed size and
hash. Nothing on the store is trusted: the whole manifest is checked (schema, every name a relative path that
resolves inside that cache folder, symlinks included) before the first byte of any other file is fetched.
"""
from __future__ import annotations

import calendar
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import tempfile
import time
from pathlib import Path

from img2prompt import storage
from img2prompt.atomic import write_atomic, write_json_atomic
from img2prompt.errors import UserError, short_reason
from img2prompt.index.layout import MANIFEST, file_sha256

log = logging.getLogger(__name__)

GENERATION = "generation"  # manifest key on the store only: the prefix holding the listed files
_GENERATION_NAME = re.compile(r"^gen-[0-9A-Za-z-]{1,64}$")
_GENERATION_TIME = re.compile(r"^gen-(\d{8}T\d{6}Z)-[0-9a-f]+$")
STALE_AFTER_S = 24 * 3600  # an unreferenced generation this old is a killed publish's leftover
MANIFEST_LIMIT = 64 << 20  # a manifest is kilobytes; a store serving more is not serving an index


def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def _stored_name(manifest: dict, name: str) -> str:
    """Where a listed file lives under the index's prefix."""
    generation = manifest.get(GENERATION)
    return f"{generation}/{name}" if generation else name


def new_generation() -> str:
    return f"gen-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}-{secrets.token_hex(4)}"


def _is_local(fs) -> bool:
    protocol = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    return bool({"file", "local"} & set(protocol))


def _put(fs, local: Path, remote: str) -> None:
    try:
        fs.put_file(str(local), remote)
    except FileNotFoundError:  # a file:// store without the folder yet (an object store has no folders)
        fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
        fs.put_file(str(local), remote)


def _put_manifest(fs, root: str, manifest: dict) -> None:
    """The commit: one PUT (object stores replace an object whole), or a temp file renamed on a local target."""
    with tempfile.TemporaryDirectory(prefix="img2prompt-publish-") as scratch:
        local = Path(scratch) / MANIFEST
        local.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
        if not _is_local(fs):
            fs.put_file(str(local), _join(root, MANIFEST))
            return
        temp = _join(root, f".{MANIFEST}.{manifest[GENERATION]}.tmp")
        fs.put_file(str(local), temp)
        os.replace(fs._strip_protocol(temp), fs._strip_protocol(_join(root, MANIFEST)))


def _committed(fs, root: str) -> dict | None:
    """The manifest the store holds now (None: none, or not one this tool could read)."""
    fs.invalidate_cache()  # every listing: s3fs drops only the path's parents
    try:
        manifest = json.loads(fs.cat_file(_join(root, MANIFEST)))
    except (FileNotFoundError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def publish(folder: Path, url: str) -> None:
    """Upload the index at `folder` to `url` so that a reader sees the old index or the new one at every
    instant (the protocol in this module's docstring)."""
    folder = Path(folder)
    manifest = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    fs, root = storage.filesystem(url)
    fs.makedirs(root, exist_ok=True)  # a local or file:// target needs its folder; object stores: a no-op
    generation = new_generation()
    for name in manifest.get("files", {}):
        _put(fs, folder / name, _join(root, f"{generation}/{name}"))
    old = _committed(fs, root)  # read just before the switch: what this publish replaces
    _put_manifest(fs, root, {**manifest, GENERATION: generation})
    _drop_stale(fs, root, generation, old)


def _generation_age_s(name: str) -> float | None:
    found = _GENERATION_TIME.match(name)
    if not found:
        return None
    return time.time() - calendar.timegm(time.strptime(found[1], "%Y%m%dT%H%M%SZ"))


def _drop_stale(fs, root: str, keep: str, old: dict | None) -> None:
    """Delete what no committed manifest points at any more: the replaced index's generation (or its plain
    top-level files, published before generations), and generations older than STALE_AFTER_S (a killed
    publish's; a younger one may be another publisher's upload in flight). Best effort: the new index is
    committed already, and the next publish tries again."""
    from img2prompt.index.manifest import is_relative_name

    replaced = old.get(GENERATION) if old is not None else None
    stale = [(_join(root, replaced), True)] if isinstance(replaced, str) and _GENERATION_NAME.match(replaced) \
        and replaced != keep else []
    fs.invalidate_cache()
    try:
        for entry in fs.ls(root, detail=False):
            name = entry.rstrip("/").rsplit("/", 1)[-1]
            age = _generation_age_s(name)
            if name not in (keep, replaced) and age is not None and age > STALE_AFTER_S:
                stale.append((_join(root, name), True))
    except (FileNotFoundError, NotImplementedError):
        pass
    if old is not None and not old.get(GENERATION) and isinstance(old.get("files"), dict):
        stale += [(_join(root, name), False) for name in old["files"] if is_relative_name(name)]
    for path, recursive in stale:
        try:
            if recursive:
                fs.rm(path, recursive=True)
            elif fs.exists(path):
                fs.rm_file(path)
        except Exception as exc:  # whatever the backend raises: leftovers cost space, never correctness
            log.warning("%s: could not delete the replaced index's file (%s); it is not part of the index",
                        path, short_reason(exc))


def _valid(path: Path, listed: dict) -> bool:
    return path.is_file() and path.stat().st_size == listed.get("bytes") and (
        "sha256" not in listed or file_sha256(path) == listed["sha256"])


def _read_manifest(fs, root: str, url: str) -> tuple[bytes, dict]:
    """The store's manifest, raw and parsed, checked whole (schema, file names, generation) before any file
    it lists is touched."""
    from img2prompt.index.reader import check_manifest

    fs.invalidate_cache()
    try:
        with fs.open(_join(root, MANIFEST), "rb") as source:
            raw = source.read(MANIFEST_LIMIT + 1)
    except FileNotFoundError as exc:
        raise UserError(f"{url}: not an index (no {MANIFEST}; an upload that did not finish?)") from exc
    if len(raw) > MANIFEST_LIMIT:
        raise UserError(f"{_join(url, MANIFEST)}: larger than {MANIFEST_LIMIT:,} bytes: not an index manifest")
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{_join(url, MANIFEST)}: not valid JSON ({short_reason(exc)})") from exc
    if not isinstance(manifest, dict):
        raise UserError(f"{_join(url, MANIFEST)}: holds a JSON {type(manifest).__name__}, not an object: not an index")
    check_manifest(url, manifest)
    generation = manifest.get(GENERATION)
    if generation is not None and not (isinstance(generation, str) and _GENERATION_NAME.match(generation)):
        raise UserError(f"{_join(url, MANIFEST)}: manifest is damaged (invalid: {GENERATION} {generation!r})")
    return raw, manifest


def _targets(local: Path, manifest: dict, url: str) -> dict[str, Path]:
    """Each listed name's path in the cache folder, refused unless it resolves inside it (a symlink left in
    the cache that points elsewhere included)."""
    base = local.resolve()
    targets = {}
    for name in [*manifest["files"], MANIFEST]:
        target = local / name
        resolved = target.resolve()
        if resolved == base or not resolved.is_relative_to(base):
            raise UserError(f"{_join(url, MANIFEST)}: file name {name!r} resolves outside the cache folder {local}: "
                            "refused, nothing fetched")
        targets[name] = target
    return targets


class _Republished(Exception):
    """A listed file vanished because a newer publish replaced the index while it was being fetched."""


def fetch(url: str) -> Path:
    """A local folder holding the committed remote index (downloaded, or the valid cached copy)."""
    for _ in range(3):
        try:
            return _fetch_once(url)
        except _Republished:
            continue  # the new manifest names the new files: read it again
    raise UserError(f"{url}: the index was republished while it was being fetched, three times: run again")


def _fetch_once(url: str) -> Path:
    fs, root = storage.filesystem(url)
    raw, manifest = _read_manifest(fs, root, url)
    digest = hashlib.sha256(url.encode() + b"\0" + raw).hexdigest()[:24]
    local = storage.cache_root() / "index" / digest
    local.mkdir(parents=True, exist_ok=True)
    targets = _targets(local, manifest, url)
    files = manifest["files"]
    if digest in _checked and targets[MANIFEST].is_file() and all(
            targets[name].is_file() and targets[name].stat().st_size == listed["bytes"]
            for name, listed in files.items()):
        return local  # hashed in this process already (the CLI's preflight, then open): sizes suffice now
    for name, listed in files.items():
        if not _valid(targets[name], listed):  # else the cached copy still matches the manifest
            _download(fs, root, url, raw, manifest, name, targets[name])
    cached = {key: value for key, value in manifest.items() if key != GENERATION}  # a plain local index
    write_json_atomic(targets[MANIFEST], cached)  # last: the cached folder is an index only once complete
    _checked.add(digest)
    return local


def _download(fs, root: str, url: str, raw: bytes, manifest: dict, name: str, target: Path) -> None:
    listed = manifest["files"][name]
    remote = _join(root, _stored_name(manifest, name))
    try:
        size = fs.info(remote).get("size")
    except FileNotFoundError as exc:
        if _manifest_changed(fs, root, raw):
            raise _Republished from exc
        raise UserError(f"{url}: {name} is listed in {MANIFEST} but missing from the store") from exc
    if size != listed["bytes"]:
        raise UserError(f"{url}: {name} holds {size} bytes, {MANIFEST} lists {listed['bytes']}")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        write_atomic(target, lambda handle: _copy_from(fs, remote, handle))
    except Exception as exc:  # a dropped connection or short body, whatever the fsspec backend raises
        # write_atomic re-raises a read's OSError as a plain OSError naming the target: the backend's own
        # FileNotFoundError (memory://, http(s):// raise one without an errno) is its cause
        gone = isinstance(exc, FileNotFoundError) or isinstance(exc.__cause__, FileNotFoundError)
        if gone and _manifest_changed(fs, root, raw):
            raise _Republished from exc
        raise UserError(f"{url}: downloading {name} failed ({type(exc).__name__}: {short_reason(exc)}); "
                        "run again to retry (the files already fetched are kept)") from exc
    if not _valid(target, listed):
        target.unlink(missing_ok=True)
        raise UserError(f"{url}: {name} does not match the size/sha256 in {MANIFEST}")


def _manifest_changed(fs, root: str, raw: bytes) -> bool:
    fs.invalidate_cache()
    try:
        return fs.cat_file(_join(root, MANIFEST)) != raw
    except FileNotFoundError:
        return True


_checked: set[str] = set()  # cache folders whose every file was checked against the manifest in this process


def _copy_from(fs, remote: str, handle) -> None:
    """Stream one remote file into `handle` (an index file can be tens of GB: never read it whole)."""
    with fs.open(remote, "rb") as source:
        shutil.copyfileobj(source, handle, 1 << 22)
