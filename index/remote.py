"""An index on an object store (s3://, memory://, ...): publish a built folder, fetch one into a local cache.

There is no rename on an object store, so the commit point is the manifest, uploaded LAST: a reader trusts a
remote index only when manifest.json is there and every file it lists exists with the listed size (and, once
fetched, the listed sha256). A killed upload leaves data files without a manifest: not an index, and a new
publish overwrites them. Reading needs local files (the shards are memmapped and faiss maps its file), so
`fetch` copies the index into ~/.cache/img2prompt/remote/index/<hash of url + manifest> and reuses it while
every file there still has its listed size and hash.
"""
from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from img2prompt import storage
from img2prompt.atomic import write_atomic, write_json_atomic
from img2prompt.errors import UserError
from img2prompt.index.layout import MANIFEST, file_sha256



def _join(url: str, name: str) -> str:
    return url.rstrip("/") + "/" + name


def publish(folder: Path, url: str) -> None:
    """Upload every file the local manifest lists, then the manifest itself (the commit point)."""
    manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
    fs, root = storage.filesystem(url)
    fs.makedirs(root, exist_ok=True)  # a local or file:// target needs its folder; object stores: a no-op
    for name in manifest.get("files", {}):
        fs.put_file(str(Path(folder) / name), _join(root, name))
    fs.put_file(str(Path(folder) / MANIFEST), _join(root, MANIFEST))


def _valid(path: Path, listed: dict) -> bool:
    return path.is_file() and path.stat().st_size == listed.get("bytes") and (
        "sha256" not in listed or file_sha256(path) == listed["sha256"])


def fetch(url: str) -> Path:
    """A local folder holding the committed remote index (downloaded, or the valid cached copy)."""
    fs, root = storage.filesystem(url)
    try:
        raw = fs.cat_file(_join(root, MANIFEST))
    except FileNotFoundError as exc:
        raise UserError(f"{url}: not an index (no {MANIFEST}; an upload that did not finish?)") from exc
    try:
        manifest = json.loads(raw)
    except ValueError as exc:
        raise UserError(f"{_join(url, MANIFEST)}: not valid JSON ({exc})") from exc
    digest = hashlib.sha256(url.encode() + b"\0" + raw).hexdigest()[:24]
    local = storage.cache_root() / "index" / digest
    if digest in _checked and (local / MANIFEST).is_file() and all(
            (local / name).is_file() and (local / name).stat().st_size == listed.get("bytes")
            for name, listed in manifest.get("files", {}).items()):
        return local  # hashed in this process already (the CLI's preflight, then open): sizes suffice now
    local.mkdir(parents=True, exist_ok=True)
    for name, listed in manifest.get("files", {}).items():
        target = local / name
        if _valid(target, listed):
            continue  # the cached copy still matches the manifest
        remote = _join(root, name)
        try:
            size = fs.info(remote).get("size")
        except FileNotFoundError as exc:
            raise UserError(f"{url}: {name} is listed in {MANIFEST} but missing from the store") from exc
        if size != listed.get("bytes"):
            raise UserError(f"{url}: {name} holds {size} bytes, {MANIFEST} lists {listed.get('bytes')}")
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            write_atomic(target, lambda handle, remote=remote: _copy_from(fs, remote, handle))
        except Exception as exc:  # a dropped connection or short body, whatever the fsspec backend raises
            raise UserError(f"{url}: downloading {name} failed ({type(exc).__name__}: {str(exc)[:200]}); "
                            "run again to retry (the files already fetched are kept)") from exc
        if not _valid(target, listed):
            target.unlink(missing_ok=True)
            raise UserError(f"{url}: {name} does not match the size/sha256 in {MANIFEST}")
    write_json_atomic(local / MANIFEST, manifest)  # last: the cached folder is an index only once complete
    _checked.add(digest)
    return local


_checked: set[str] = set()  # cache folders whose every file was checked against the manifest in this process


def _copy_from(fs, remote: str, handle) -> None:
    """Stream one remote file into `handle` (an index file can be tens of GB: never read it whole)."""
    with fs.open(remote, "rb") as source:
        shutil.copyfileobj(source, handle, 1 << 22)
