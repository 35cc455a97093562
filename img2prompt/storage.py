"""The storage seam: local paths and fsspec URLs (memory://, file://, s3://, https://, hf://) behind one door.

Bottom layer (imports only errors): build_index/ and query/ call it for anything that may be remote. fsspec
is an optional extra; a URL without it installed is a one-line error naming the extra, never an ImportError.
"""
from __future__ import annotations

import re
from typing import IO, Any

from img2prompt.errors import UserError

# scheme:// with a scheme of 2+ characters, so a Windows drive ("C:\\x", "C://x") is never a URL.
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]+://")
EXTRA_HINT = 'pip install "img2prompt[remote]"'
# Keys of fs.info() that change when an object's content does, most specific first.
_IDENTITY_KEYS = ("ETag", "etag", "VersionId", "version_id", "sha256", "oid", "md5", "checksum", "size",
                  "mtime", "LastModified", "last_modified", "created")


def is_url(path: Any) -> bool:
    """True for "scheme://..." strings; Path objects and plain file names are local."""
    return isinstance(path, str) and bool(_URL.match(path))


def filesystem(url: str):
    """(fsspec filesystem, path inside it) for a URL; one-line errors for a missing extra or protocol."""
    try:
        import fsspec
    except ImportError as exc:
        raise UserError(f"{url}: reading URLs needs fsspec: {EXTRA_HINT}") from exc
    try:
        fs, inner = fsspec.core.url_to_fs(url)
    except (ImportError, ValueError) as exc:
        scheme = url.split("://", 1)[0]
        raise UserError(f"{url}: no usable fsspec backend for {scheme}:// ({exc}); try {EXTRA_HINT}") from exc
    return fs, inner


def open_read(path: Any) -> IO[bytes]:
    """A binary stream (seekable for fsspec files, so pyarrow can read parquet by row group)."""
    if not is_url(path):
        return open(path, "rb")
    fs, inner = filesystem(path)
    try:
        return fs.open(inner, "rb")
    except FileNotFoundError as exc:
        raise UserError(f"{path}: not found") from exc
    except OSError as exc:
        raise UserError(f"{path}: cannot open ({exc})") from exc


def info(path: str) -> dict:
    fs, inner = filesystem(path)
    try:
        return fs.info(inner)
    except FileNotFoundError as exc:
        raise UserError(f"{path}: not found") from exc


def is_file(path: Any) -> bool:
    if not is_url(path):
        from pathlib import Path

        return Path(path).is_file()
    try:
        return info(path).get("type", "file") == "file"
    except UserError:
        return False


def identity(path: str) -> dict:
    """What names this object's content for a resume key: the URL plus ETag / version / size / mtime as
    the backend reports them (values turned to strings, so a manifest round trip compares equal)."""
    details = info(path)
    found = {key: str(details[key]) for key in _IDENTITY_KEYS if details.get(key) not in (None, "")}
    return {"url": path, **found}


def check_identity(recorded: dict) -> None:
    """Refuse to resume over a remote file whose content changed since the run began."""
    now = identity(recorded["url"])
    if now != recorded:
        changed = sorted(key for key in set(now) | set(recorded) if now.get(key) != recorded.get(key))
        raise UserError(f"{recorded['url']}: changed since the build began ({', '.join(changed)} differ); "
                        "start a fresh build (--overwrite) or restore the file")


def expand_url(pattern: str) -> list[str]:
    """A URL or URL glob → matching file URLs, sorted, each with the pattern's scheme."""
    fs, inner = filesystem(pattern)
    scheme = pattern.split("://", 1)[0]
    if any(char in inner for char in "*?["):
        matches = sorted(fs.glob(inner))
        # memory:// paths come back as "/x" (written "memory://x"); file:// ones as "/abs" (file:///abs)
        return [match if is_url(match) else f"{scheme}://{match.lstrip('/') if scheme == 'memory' else match}"
                for match in matches]
    return [pattern]


def suffix(path: Any) -> str:
    """The lower-case file suffix of a path or URL (query string ignored)."""
    name = str(path).split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    return ("." + name.rsplit(".", 1)[-1].lower()) if "." in name else ""


class UrlPath:
    """A remote file standing where the corpus readers expect a Path: `suffix`, `name`, `is_file()`,
    `stat().st_size` and `str()` (the URL) work, so only the open() calls need to go through the seam."""

    def __init__(self, url: str):
        self.url = url

    def __str__(self) -> str:
        return self.url

    __repr__ = __str__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, UrlPath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    @property
    def suffix(self) -> str:
        return suffix(self.url)

    @property
    def name(self) -> str:
        return self.url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]

    def is_file(self) -> bool:
        return is_file(self.url)

    def stat(self):
        from types import SimpleNamespace

        return SimpleNamespace(st_size=int(info(self.url).get("size") or 0))

    def resolve(self) -> "UrlPath":
        return self


def as_path(text: str):
    """A Path for a local name, a UrlPath for a URL."""
    from pathlib import Path

    return UrlPath(text) if is_url(text) else Path(text)


CACHE_ENV = "IMG2PROMPT_CACHE_DIR"


def cache_root():
    import os
    from pathlib import Path

    root = os.environ.get(CACHE_ENV) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "img2prompt")
    return Path(root) / "remote"


def local_copy(url: str, block: int = 1 << 22):
    """A local file with the URL's content, for readers that need one: np.load(mmap_mode="r") and the index's
    memmapped shards map a file descriptor, which an object store cannot give. Cached under a folder named
    by a hash of the URL and its identity, so a changed remote object gets a new copy (and a new build key);
    the copy lands atomically (a killed download leaves no half file) and a size mismatch is refused."""
    import hashlib
    import json

    from img2prompt.atomic import write_atomic

    found = identity(url)
    digest = hashlib.sha256(json.dumps(found, sort_keys=True).encode()).hexdigest()[:24]
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1]
    # the name may come from a store's listing (a URL glob): only a plain file name lands in the cache folder
    target = cache_root() / digest / (name if name not in ("", ".", "..") and "\\" not in name else "file")
    size = int(found["size"]) if found.get("size", "").isdigit() else None
    if target.is_file() and (size is None or target.stat().st_size == size):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)

    def copy(handle) -> None:
        with open_read(url) as source:
            while chunk := source.read(block):
                handle.write(chunk)

    write_atomic(target, copy)
    if size is not None and target.stat().st_size != size:
        target.unlink(missing_ok=True)
        raise UserError(f"{url}: downloaded {target.stat().st_size if target.exists() else 0} bytes, "
                        f"the store lists {size}: try again")
    return target


def join(url: str, name: str) -> str:
    """`name` (a relative path, or one starting with "/": from the store's root) under the folder `url`, with
    `..` and `.` folded, so one object has one spelling: memory://a/b + ../c.png → memory://a/c.png."""
    import posixpath

    scheme, rest = url.split("://", 1)
    rest = rest.split("?", 1)[0]  # a signed URL's query belongs to the table, not to the files beside it
    host, _, folder = ("", "", rest) if scheme in ("memory", "file") else rest.partition("/")  # no host there
    joined = posixpath.normpath(posixpath.join("/" + folder.lstrip("/"), name))
    return f"{scheme}://{host}{joined.lstrip('/') if scheme == 'memory' else joined}"


def parent(url: str) -> str:
    """The folder holding a file URL (query string dropped)."""
    return url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[0]


def put_file(local, url: str) -> None:
    """Upload one local file to `url` (one PUT on an object store: the object is complete or absent).
    Raises what the backend raises; callers name the URL in their own one-line error."""
    fs, inner = filesystem(url)
    try:
        fs.put_file(str(local), inner)
    except FileNotFoundError:  # a file:// store without the folder yet (an object store has no folders)
        fs.makedirs(fs._strip_protocol(parent(url)), exist_ok=True)
        fs.put_file(str(local), inner)


def get_file(url: str, target, block: int = 1 << 22) -> None:
    """Download `url` into the local file `target`, streamed and atomically (a dropped connection leaves no
    half file). Raises FileNotFoundError or what the backend raises."""
    from img2prompt.atomic import write_atomic

    fs, inner = filesystem(url)
    fs.invalidate_cache(inner)  # a listing cached earlier in this process must not hide a new object

    def copy(handle) -> None:
        with fs.open(inner, "rb") as source:
            while chunk := source.read(block):
                handle.write(chunk)

    write_atomic(target, copy)


def remove_tree(url: str) -> None:
    """Delete everything under the prefix `url` (nothing there: nothing to do)."""
    fs, inner = filesystem(url)
    fs.invalidate_cache(inner)
    if fs.exists(inner):
        fs.rm(inner, recursive=True)


def read_bytes(url: str, limit: int) -> bytes:
    """At most `limit` bytes of the object (a larger object raises ValueError, before it is read whole).
    Raises FileNotFoundError for a missing object and what the backend raises otherwise."""
    fs, inner = filesystem(url)
    with fs.open(inner, "rb") as source:
        data = source.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"larger than {limit:,} bytes")
    return data
