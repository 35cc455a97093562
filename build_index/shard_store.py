"""Where a remote build worker leaves a shard's files for the driver to commit: the one seam between the Ray
engine and storage.

    SharedFolder   --out a local path: the index folder itself, on a filesystem every node mounts; the worker
                   writes into it (after checking it sees the folder's manifest), the driver has nothing to do
    ShardStore     --out a URL: a prefix on the store (<out>/.shards/); the worker encodes into its own temp
                   folder, uploads each file (one PUT: on an object store an object is complete or absent),
                   deletes the temp folder and returns the record; the driver downloads the files into its
                   local staging folder and checks bytes and sha256 against the record before committing

Nothing on the store is trusted: a file is committed only once the driver's copy matches the record the worker
returned, so a stale object (a killed run, a half upload on a store without atomic PUT) is never committed, and
a shard whose record the driver never got is encoded again on --resume. A committed shard's objects are deleted
(the store holds only shards in flight); the prefix goes when the index is published.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from img2prompt import storage
from img2prompt.errors import UserError, short_reason
from img2prompt.index.layout import MANIFEST, SHARD_SUFFIXES, SHARDS, file_record, shard_path

SHARD_PREFIX = ".shards"  # under the --out URL: the shards the workers have sent and the driver not yet committed


class ShardStoreError(OSError):
    """A worker could not upload a shard: the message names the object's URL (the shard is tried again)."""


class SharedFolder:
    """The index folder, on a filesystem every node mounts at the same path."""

    def __init__(self, root: str) -> None:
        self.root = root

    def check_worker(self, host: str) -> None:
        """Refuse at a worker's start a node that does not see the folder (a UserError stops the build)."""
        if not (Path(self.root) / MANIFEST).is_file():
            raise UserError(f"the Ray worker on {host} does not see the index folder {self.root}: --out must be "
                            "on a filesystem every node mounts at the same path (or a URL: s3://, gs://, ...)")

    @contextlib.contextmanager
    def worker_folder(self) -> Iterator[str]:
        yield self.root

    def send(self, folder: str, record: dict, host: str) -> dict:
        """Nothing to send: the files are in the index folder already (no phase seconds)."""
        return {}

    def receive(self, record: dict, root: str | Path) -> dict:
        """Nothing to fetch: the worker wrote into `root`."""
        return {}

    def discard(self, record: dict) -> None:
        """Nothing to delete: the shard files are the index's own."""


class ShardStore:
    """Shards in flight under a URL prefix (picklable: only the URL travels; each process opens the store
    with its own fsspec configuration and credentials)."""

    def __init__(self, url: str) -> None:
        self.url = url.rstrip("/")

    def check_driver(self) -> None:
        """Refuse, before the build starts, a store the workers cannot share with the driver."""
        if self.url.startswith("memory://"):
            raise UserError(f"{self.url}: memory:// lives inside one process, so remote workers cannot hand shards "
                            "to the driver through it: use an object store (s3://, gs://, ...) or a shared file://")

    def _object(self, name: str) -> str:
        return f"{self.url}/{name}"

    def check_worker(self, host: str) -> None:
        """Write and delete a probe object: a node without credentials or a route to the store fails at its
        start, in one line naming the URL, rather than after encoding a shard."""
        probe = self._object(f".probe-{uuid.uuid4().hex}")
        try:
            with tempfile.NamedTemporaryFile() as local:
                local.write(host.encode())
                local.flush()
                storage.put_file(local.name, probe)  # the upload path the shards take (a file:// folder made)
            fs, inner = storage.filesystem(probe)
            fs.rm_file(inner)
        except UserError:
            raise
        except Exception as exc:  # whatever the backend raises for no route, no credentials, no permission
            raise UserError(f"{self.url}: the Ray worker on {host} cannot write there ({type(exc).__name__}: "
                            f"{short_reason(exc, 200)}): give every node access to the store (credentials, "
                            "endpoint, network)") from None

    @contextlib.contextmanager
    def worker_folder(self) -> Iterator[str]:
        """A private temp folder for one shard's files, removed however the encoding ends."""
        folder = tempfile.mkdtemp(prefix="img2prompt-shard-")
        try:
            yield folder
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def send(self, folder: str, record: dict, host: str) -> dict:
        """Upload the shard's files (worker side); a failure is retried as the shard's next try. Returns the
        phase seconds ({"send_shard": s})."""
        started = time.perf_counter()
        for kind in record["files"]:
            local = shard_path(Path(folder), record["number"], kind)
            url = self._object(local.name)
            try:
                storage.put_file(local, url)
            except UserError:
                raise
            except Exception as exc:
                raise ShardStoreError(f"{url}: upload from the Ray worker on {host} failed ({type(exc).__name__}: "
                                      f"{short_reason(exc, 200)})") from None
        return {"send_shard": time.perf_counter() - started}

    def receive(self, record: dict, root: str | Path) -> dict:
        """Download the shard's files into the driver's index folder and check them against the record;
        returns the phase seconds ({"receive_shard": s})."""
        started = time.perf_counter()
        check_record(self.url, record)
        (Path(root) / SHARDS).mkdir(parents=True, exist_ok=True)
        for kind, listed in record["files"].items():
            target = shard_path(Path(root), record["number"], kind)
            url = self._object(target.name)
            try:
                storage.get_file(url, target)
            except Exception as exc:
                raise UserError(f"{url}: fetching shard {record['number']} from the store failed "
                                f"({type(exc).__name__}: {short_reason(exc, 200)}); run again with --resume") from None
            if file_record(target) != {"bytes": listed["bytes"], "sha256": listed["sha256"]}:
                target.unlink(missing_ok=True)
                raise UserError(f"{url}: not the bytes the Ray worker reported for shard {record['number']} (size or "
                                "sha256 differ; is another build writing to this --out?); run again with --resume")
        return {"receive_shard": time.perf_counter() - started}

    def discard(self, record: dict) -> None:
        """Delete a committed shard's objects (best effort: what is left goes with the prefix at publish)."""
        for kind in record["files"]:
            with contextlib.suppress(Exception):
                fs, inner = storage.filesystem(self._object(shard_path(Path("."), record["number"], kind).name))
                fs.rm_file(inner)

    def clear(self) -> None:
        """Remove the prefix: before a fresh build (what a killed run left) and after publish."""
        storage.remove_tree(self.url)


def check_record(url: str, record: Any) -> None:
    """A record names the files the driver writes into its staging folder: only the shard kinds this
    version writes, a non-negative shard number, a size and a sha256 each (never a file name of its own)."""
    files = record.get("files") if isinstance(record, dict) else None
    number = record.get("number") if isinstance(record, dict) else None
    if not (isinstance(number, int) and not isinstance(number, bool) and number >= 0 and isinstance(files, dict)
            and files and set(files) <= set(SHARD_SUFFIXES) and all(
                isinstance(listed, dict) and isinstance(listed.get("bytes"), int)
                and isinstance(listed.get("sha256"), str) for listed in files.values())):
        raise UserError(f"{url}: a Ray worker returned a malformed shard record ({short_reason(repr(record), 120)}); "
                        "is another img2prompt version running on the cluster? run again with --resume")


def shard_store_url(out_url: str) -> str:
    """Where the workers of a build to `out_url` send their shards."""
    return storage.join(out_url, SHARD_PREFIX)

