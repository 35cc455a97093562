"""The public Python API: the one trunk that the CLI, the server, the Kaggle kit and its notebook call.

    import img2prompt
    with img2prompt.open_index("/kaggle/input/my-index", clip_model="/kaggle/input/my-kit/clip") as index:
        index.submission("/kaggle/input/stable-diffusion-image-to-prompts/images", "submission.csv")

Opening an index loads its CLIP model (identity-checked against the manifest) and the search backend once;
every call after that reuses them. Errors are `img2prompt.UserError` with the one-line message the CLI prints.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from img2prompt.errors import UserError
from img2prompt.query.results import ImageInput, SearchResult
from img2prompt.query.interrogate import DEFAULT_MODIFIERS
from img2prompt.encoders import DEFAULT_DEVICE
from img2prompt.query.settings import DEFAULT_SEARCH_K, DEFAULT_SUBMISSION, WEIGHTINGS, ImageLoading, RetrievalSettings, SettingError


def build(corpus: str | Sequence[str], out: str | Path, *, clip_model: str, clip_pretrained: str | None = None,
          text_model: str | None = None, **options: Any):
    """Build an index folder from prompt files; see `img2prompt build --help` for the options.

    Returns a BuildResult (manifest, corpus report, timings). Extra keyword options are BuildOptions fields
    (column, batch_size, device, shard_size, index, max_memory, resume, overwrite, max_chars, workers, progress,
    pairs: (image, prompt) tables for image-keyed entries, regression: fit the ridge head, engine, near_dup: T,
    key_dims: D, minilm_dtype: "int8"). clip_model (and clip_pretrained) may be lists: one index holding several
    CLIP models' keys. `out` (and corpus files) may be URLs (the `remote` extra).
    """
    from img2prompt.build_index.runner import BuildOptions, run_build

    if options.get("pairs"):
        options["pairs"] = _paths(options["pairs"])
    return run_build(BuildOptions(corpus=_paths(corpus), out=str(out), clip_model=clip_model,
                                  clip_pretrained=clip_pretrained, text_model=text_model, **options))


def add(index: str | Path, corpus: str | Sequence[str], *, clip_model: str | Sequence[str] | None = None,
        **options: Any):
    """Grow a complete index with new prompt files (deduplicated against it, encoded with its own models).

    clip_model: where the index's CLIP weights are here (default: as its manifest names them). Extra keyword
    options are AddOptions fields (clip_pretrained, text_model, column, batch_size, device, shard_size,
    max_chars, resume, progress, retrain, pairs). Returns a BuildResult (report["added"]: rows added; 0 leaves
    the index untouched); the manifest's "history" lists each add.
    """
    from img2prompt.build_index.add import AddOptions, run_add

    if options.get("pairs"):
        options["pairs"] = _paths(options["pairs"])
    return run_add(AddOptions(index=str(index), corpus=_paths(corpus), clip_model=clip_model, **options))


def _paths(paths: str | Path | Sequence[str | Path]) -> list[str]:
    """One path or several, as the list of strings the option dataclasses hold."""
    return [str(paths)] if isinstance(paths, (str, Path)) else [str(path) for path in paths]


def merge(indexes: Sequence[str | Path], out: str | Path, *, clip_model: str | Sequence[str] | None = None,
          **options: Any):
    """Merge complete indexes built with the same models into `out` (rows copied, prompts deduplicated across
    them, first index wins). Extra keyword options are MergeOptions fields (clip_pretrained, text_model, device,
    shard_size, overwrite, resume, progress). Returns a BuildResult; report["merged"] counts each input's duplicates.
    """
    from img2prompt.build_index.merge import MergeOptions, run_merge

    return run_merge(MergeOptions(indexes=[str(index) for index in indexes], out=str(out), clip_model=clip_model,
                                  **options))


def open_index(path: str | Path, *, device: str = DEFAULT_DEVICE, clip_model: str | None = None,
               clip_pretrained: str | None = None, text_model: str | None = None, verify: bool = False,
               lazy: bool = False, precision: str | None = None):
    """Open a built index with its CLIP model; returns an `Img2PromptIndex` (also a context manager).

    clip_model / clip_pretrained re-point to where the index's CLIP weights live on this machine (e.g. a kit's
    `clip/` folder); the weights and architecture must be the ones the index was built with. lazy: read and
    check the manifest now, load the models on first use (what the CLI does, so that a bad argument is
    refused in well under a second). precision: "fp32", "fp16" or "bf16" for the CLIP towers (default: fp16
    autocast on CUDA, fp32 on CPU).
    """
    from img2prompt.query.opened_index import Img2PromptIndex
    from img2prompt.storage import is_url

    if is_url(path):  # an index on an object store: read from its validated local cache copy
        from img2prompt.index.remote import fetch

        path = fetch(path)
    return Img2PromptIndex.open(path, device=device, clip_model=clip_model, clip_pretrained=clip_pretrained,
                                text_model=text_model, verify=verify, lazy=lazy, precision=precision)


def check_query(command: str, index: str | Path, settings: RetrievalSettings, **paths: Any) -> None:
    """Everything `command` ("search", "submit", "eval"; any other: the settings alone) can refuse from its arguments, the manifest and the
    file system, in well under a second (no torch, no model): what the CLI runs before opening the index."""
    from img2prompt.query import preflight

    opened = preflight.check_settings(index, settings)
    if command == "search":
        preflight.check_search_images(paths.get("images") or (), paths.get("recursive", False))
    elif command == "submit":
        preflight.check_submit_paths(opened.root, paths["images"], paths["out"], paths.get("explain"),
                                     paths.get("save_npy"), paths.get("sample_submission"))
    elif command == "eval":
        preflight.check_eval_paths(opened.root, paths["labels"], paths.get("images"), paths.get("out"),
                                   paths.get("plot"), paths.get("sweep", False), dict(paths.get("captions") or []))


def check_environment() -> None:
    """One line (a UserError) when the installed torch/torchvision pair cannot work, before anything imports it."""
    from img2prompt.encoders.stack import check_torch_stack

    check_torch_stack()


def environment_problem() -> str | None:
    """One line naming the fix when torch/torchvision cannot be imported together (versions that do not match,
    or matching versions of different builds: a CPU torch beside a CUDA torchvision), else None. Imports both:
    what a notebook runs right after `import img2prompt`, and the CLI when a command failed inside an import."""
    from img2prompt.encoders.stack import import_problem

    return import_problem()


def build_choices() -> dict:
    """What `build` can be asked for, from the registries: index kinds, engines and each engine's own flags."""
    from img2prompt.build_index.engine import ENGINES
    from img2prompt.index.plan import INDEX_KINDS

    return {"index": list(INDEX_KINDS), "engines": ENGINES}


def option_defaults(command: str) -> dict[str, Any]:
    """Each option's default for `command` ("build", "add" or "merge"), read from its options dataclass (the one
    place each is written): what `--help` shows. Imports the build stage (torch): call it only to show them."""
    import dataclasses

    if command == "build":
        from img2prompt.build_index.runner import BuildOptions as options
    elif command == "add":
        from img2prompt.build_index.add import AddOptions as options
    elif command == "merge":
        from img2prompt.build_index.merge import MergeOptions as options
    else:
        raise ValueError(f"no options dataclass for {command!r}")
    return {field.name: field.default if field.default_factory is dataclasses.MISSING else field.default_factory()
            for field in dataclasses.fields(options)}


def format_search(results: list[SearchResult], as_json: bool = False) -> str:
    """`img2prompt search` output: a table, or JSON ([{query, results: [{rank, score, prompt, id, key}]}])."""
    from img2prompt.query.lookup import format_json, format_table

    return format_json(results) + "\n" if as_json else format_table(results)


def interrogation_echo(handle, as_json: bool = False):
    """`img2prompt interrogate`'s printing of each result as it comes (`interrogate_folder(echo=...)`):
    `IMAGE: prompt` lines or one JSON array; call its close() at the end."""
    from img2prompt.query.prompt_output import Echo

    return Echo(handle, as_json)


def format_eval_report(report: dict) -> str:
    """`img2prompt eval`'s text report of `Img2PromptIndex.evaluate`'s dict."""
    from img2prompt.query.eval_report import format_report

    return format_report(report)


def npy_ids_path(npy: str | Path) -> Path:
    """Where `submission(save_npy=...)` writes the imgId order of the predictions array."""
    from img2prompt.query.preflight import npy_ids_path as ids_path

    return ids_path(npy)


__all__ = ["add", "build", "merge", "build_choices", "option_defaults", "DEFAULT_MODIFIERS", "DEFAULT_DEVICE", "DEFAULT_SEARCH_K", "DEFAULT_SUBMISSION", "check_environment", "check_query", "environment_problem", "ImageLoading", "open_index", "RetrievalSettings", "SearchResult", "SettingError", "UserError", "WEIGHTINGS",
           "format_search", "format_eval_report", "interrogation_echo", "npy_ids_path"]
