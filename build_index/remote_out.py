"""`build --out <URL>`: build into a local staging folder (kept between runs, so --resume works there), then
publish it to the store with the manifest uploaded last (see img2prompt.index.remote for the commit rule).
A distributed engine's workers share no disk with that folder: they send their shards through <URL>/.shards/
(build_index/shard_store.py), which the driver fetches, checks and commits; the prefix goes after publish."""
from __future__ import annotations

import dataclasses
import hashlib

from img2prompt import storage
from img2prompt.build_index.shard_store import shard_store_url
from img2prompt.errors import UserError
from img2prompt.index.layout import MANIFEST
from img2prompt.index.remote import publish


def staging_folder(url: str):
    return storage.cache_root() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:24]


def remote_holds_index(url: str) -> bool:
    fs, root = storage.filesystem(url)
    return fs.exists(root.rstrip("/") + "/" + MANIFEST)


def build_to_url(options, run_build):
    """run_build on a local staging folder named by the URL, then upload it."""
    if not (options.overwrite or options.resume) and remote_holds_index(options.out):
        raise UserError(f"{options.out} already holds an index: pass --overwrite to replace it")
    folder = staging_folder(options.out)
    folder.parent.mkdir(parents=True, exist_ok=True)
    shards = shard_store_url(options.out)
    storage.remove_tree(shards)  # what a killed run's workers sent is never trusted (its records are lost)
    # the staging folder is this tool's own cache: a fresh (not --resume) build replaces what a failed run left
    result = run_build(dataclasses.replace(options, out=str(folder / "index"), overwrite=not options.resume,
                                           shard_store=shards))
    publish(folder / "index", options.out)
    storage.remove_tree(shards)
    return result
