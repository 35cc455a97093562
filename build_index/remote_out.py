"""`build --out <URL>`: build into a local staging folder (kept between runs, so --resume works there), then
publish it to the store (img2prompt.index.remote: new files under a fresh generation prefix, the manifest
switched last, so readers see the old index or the new one at every instant). A `--resume` that finds the
staging folder complete (a run killed while publishing, or after) just publishes it.
A distributed engine's workers share no disk with that folder: they send their shards through <URL>/.shards/
(build_index/shard_store.py), which the driver fetches, checks and commits; the prefix goes after publish."""
from __future__ import annotations

import dataclasses
import hashlib
import time

from img2prompt import storage
from img2prompt.build_index.corpus import expand_corpus_paths, file_fingerprint
from img2prompt.build_index.pairs import expand_pair_paths
from img2prompt.build_index.result import BuildResult
from img2prompt.build_index.shard_store import shard_store_url
from img2prompt.errors import UserError
from img2prompt.index.layout import MANIFEST, STATE_COMPLETE
from img2prompt.index.manifest import read_manifest
from img2prompt.index.remote import publish


def staging_folder(url: str):
    return storage.cache_root() / "staging" / hashlib.sha256(url.encode()).hexdigest()[:24]


def remote_holds_index(url: str) -> bool:
    fs, root = storage.filesystem(url)
    fs.invalidate_cache()
    return fs.exists(root.rstrip("/") + "/" + MANIFEST)


def _differs(staged: dict, options) -> list[str]:
    """The build settings (those known without loading a model) in which the staged index differs from these
    options: a --resume publishes the staged index only when there are none."""
    build = staged.get("build") if isinstance(staged.get("build"), dict) else {}
    wanted = {"column": options.column, "shard_size": options.shard_size, "max_chars": options.max_chars,
              "batch_size": options.batch_size,
              "corpus": [file_fingerprint(path) for path in expand_corpus_paths(options.corpus)]
              if options.corpus else []}
    if options.pairs or "pairs" in build:
        wanted["pairs"] = [file_fingerprint(path) for path in expand_pair_paths(options.pairs or [])]
    if bool(options.embeddings) != bool(build.get("embeddings")):
        wanted["embeddings"] = "given" if options.embeddings else None
    return sorted(key for key, value in wanted.items()
                  if (build.get(key) if key != "embeddings" else ("given" if build.get(key) else None)) != value)


def _publish_staged(options, folder):
    """--resume over a complete staging folder: nothing to build; publish it (again)."""
    staged = read_manifest(folder / "index")
    changed = _differs(staged, options)
    if changed:
        raise UserError(f"{options.out}: cannot resume, the build settings differ from the finished build waiting "
                        f"to be published ({', '.join(changed)}); rerun with --overwrite to start over")
    started = time.perf_counter()
    publish(folder / "index", options.out)
    storage.remove_tree(shard_store_url(options.out))
    report = staged.get("corpus") if isinstance(staged.get("corpus"), dict) else {}
    return BuildResult(manifest=staged, report=report, timings={"publish": round(time.perf_counter() - started, 3)})


def build_to_url(options, run_build):
    """run_build on a local staging folder named by the URL, then upload it."""
    if not (options.overwrite or options.resume) and remote_holds_index(options.out):
        raise UserError(f"{options.out} already holds an index: pass --overwrite to replace it")
    folder = staging_folder(options.out)
    folder.parent.mkdir(parents=True, exist_ok=True)
    staged = read_manifest(folder / "index") if (folder / "index").is_dir() else None
    if options.resume and staged is not None and staged.get("state") == STATE_COMPLETE:
        return _publish_staged(options, folder)
    shards = shard_store_url(options.out)
    storage.remove_tree(shards)  # what a killed run's workers sent is never trusted (its records are lost)
    # the staging folder is this tool's own cache: a fresh (not --resume) build replaces what a failed run left
    result = run_build(dataclasses.replace(options, out=str(folder / "index"), overwrite=not options.resume,
                                           shard_store=shards))
    publish(folder / "index", options.out)
    storage.remove_tree(shards)
    return result
