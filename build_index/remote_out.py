"""`build --out <URL>`: build into a local staging folder (kept between runs, so --resume works there), then
publish it to the store with the manifest uploaded last (see img2prompt.remote_index for the commit rule)."""
from __future__ import annotations

import dataclasses
import hashlib

from img2prompt import storage
from img2prompt.remote_index import publish


def staging_folder(url: str):
    return storage.cache_root() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:24]


def build_to_url(options, run_build):
    """run_build on a local staging folder named by the URL, then upload it."""
    folder = staging_folder(options.out)
    folder.parent.mkdir(parents=True, exist_ok=True)
    result = run_build(dataclasses.replace(options, out=str(folder / "index")))
    publish(folder / "index", options.out)
    return result
