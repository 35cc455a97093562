"""The parts of bench/gpu_table.py, each run in a process of its own: `python bench/gpu_parts.py PART CONFIG CAP_S`.

gpu_table.py starts one process per part (never forking after CUDA is initialised: a part that touches CUDA
starts no Python worker by fork; the build and the servers are separate `python -m img2prompt` processes) and
kills a part's whole process group at its cap. Each part appends its figures as JSON lines to the rows file
named in CONFIG as soon as it has them, so a part killed at its cap keeps what it had finished.

    prepare  random CLIP (open_clip config, random weights, saved as a local-dir folder) + a MiniLM-shaped
             random sentence-transformers folder + the corpus file (CPU only)
    tower    (a) the CLIP text tower alone on pre-tokenized, length-bucketed batches
    build    (a) `python -m img2prompt build` end to end on the corpus (the index also serves `image` and `serve`)
    image    (b) the CLIP image tower on synthetic preprocessed pixels; then `submission()` on generated PNGs
    search   (c) torch exact search resident and streamed, and faiss-cpu flat, at --search-rows × the CLIP dim
    serve    (d) `img2prompt serve` loaded by N clients: one encoder call per request vs merged calls
    two-gpu  (e) the torch search split over cuda:all (smoke: cpu,cpu)
"""
from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("PYTORCH_NVML_BASED_CUDA_CHECK", "1")  # torch.cuda.is_available() without a CUDA context
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from common import real_prompts, synchronize, synthetic_prompts  # noqa: E402

MINILM_CONFIG = {"vocab_size": 30522, "hidden_size": 384, "num_hidden_layers": 6, "num_attention_heads": 12,
                 "intermediate_size": 1536, "max_position_embeddings": 512, "hidden_act": "gelu",
                 "type_vocab_size": 2, "pad_token_id": 0, "layer_norm_eps": 1e-12}
MINILM_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "sentence_bert_config.json", "modules.json", "config_sentence_transformers.json")
DISTINCT_IMAGES = 32  # generated once each; the rest are file copies (decoding costs the same)
PROGRESS = re.compile(r"(\d+)/(\d+) \[")  # tqdm's "n/total [" in the build's progress output


class Part:
    """One part's settings (the CONFIG json), its deadline and its row writer."""

    def __init__(self, name: str, config: dict, cap_s: float) -> None:
        self.name, self.config = name, config
        self.started = time.monotonic()
        self.deadline = self.started + cap_s - 10  # stop sub-steps in time to report before the parent's kill
        self.work = Path(config["workdir"])
        self.device = config["device"]

    def __getitem__(self, key: str):
        return self.config[key]

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def emit(self, what: str, figure, unit: str, conditions: str) -> None:
        if isinstance(figure, float):
            figure = f"{figure:,.1f}" if figure >= 10 else f"{figure:.3g}"
        elif isinstance(figure, int):
            figure = f"{figure:,}"
        line = json.dumps({"part": self.name, "what": what, "figure": str(figure), "unit": unit,
                           "conditions": conditions})
        with open(self.config["rows"], "a", encoding="utf-8") as handle:
            handle.write(line + "\n")
        print(f"row: {line}", flush=True)

    @property
    def clip_dir(self) -> Path:
        return self.work / "clip"

    @property
    def minilm_dir(self) -> Path:
        return self.work / "minilm"

    @property
    def corpus(self) -> Path:
        return self.work / "corpus.txt"

    @property
    def index_dir(self) -> Path:
        return self.work / "index"


def release_memory() -> None:
    gc.collect()
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_initialized():
            torch.cuda.empty_cache()


def load_clip_folder(part: Part):
    """The random CLIP through the checkpoint path a user's folder takes (`--clip-model local-dir:FOLDER`)."""
    from img2prompt.encoders.models import load_clip

    return load_clip(f"local-dir:{part.clip_dir}", None, part.device)


# ------------------------------------------------------------------------------------------ prepare (CPU)
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
    try:  # "Writing model shards" bars are noise in the log
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    except ImportError:
        pass
    torch.manual_seed(seed)
    BertModel(BertConfig(**MINILM_CONFIG)).save_pretrained(folder)
    return folder


def tokenizer_dir(part: Part) -> Path:
    if part["tokenizer_dir"]:
        return Path(part["tokenizer_dir"])
    from img2prompt.encoders.models import default_text_model_path

    return Path(default_text_model_path())


def prepare_part(part: Part) -> None:
    from img2prompt.stand_in import write_random_clip, write_tiny_clip

    started = time.perf_counter()
    if part["arch"] == "stand-in":
        write_tiny_clip(part.clip_dir)
    else:
        write_random_clip(part.clip_dir, part["arch"])
    size = sum(path.stat().st_size for path in part.clip_dir.iterdir()) / 2**30
    part.emit(f"random {part['arch']} folder written", time.perf_counter() - started, "s",
              f"img2prompt.stand_in (open_clip config + pretrained preprocessing, random weights, torch.save), "
              f"{size:.2f} GiB; CPU")
    started = time.perf_counter()
    write_minilm_shaped(part.minilm_dir, tokenizer_dir(part))
    part.emit("MiniLM-shaped folder written", time.perf_counter() - started, "s",
              f"all-MiniLM-L6-v2's tokenizer files + a random 6-layer 384-wide BertModel (CPU)")
    started = time.perf_counter()
    prompts = synthetic_prompts(part["prompts"], part["corpora"])
    with open(part.corpus, "w", encoding="utf-8") as handle:
        handle.writelines(prompt + "\n" for prompt in prompts)
    real = min(len(prompts), len(real_prompts(folder=part["corpora"])))
    source = "real prompts from ../shared/corpora (sd-prompts-dedup-43k + openprompts-dedup-21k)"
    how = (f"{real:,} {source}, repeated with a ', variation N' suffix (distinct strings) to reach "
           f"{len(prompts):,}" if real < len(prompts) else f"the first {real:,} {source}, no repetition")
    part.emit("corpus written", len(prompts), "prompts", f"{how}; {time.perf_counter() - started:.1f} s")


# ------------------------------------------------------------------------------------------ (a) tower
def tower_part(part: Part) -> None:
    import torch

    from img2prompt.encoders.models import clip_encode_text, supports_short_context
    from img2prompt.encoders.precision import autocast_for

    prompts = part.corpus.read_text(encoding="utf-8").splitlines()[:part["sample"]]
    clip = load_clip_folder(part)
    batch_size = part["batch_size"]
    tokens = clip.tokenizer(prompts)
    lengths = (tokens != 0).sum(1)
    order = torch.argsort(lengths, stable=True)
    short = supports_short_context(clip)
    batches = []
    for start in range(0, len(prompts), batch_size):
        rows = order[start:start + batch_size]
        batch = tokens[rows]
        batches.append(batch[:, :int(lengths[rows].max())] if short else batch)
    if clip.device.type == "cuda":
        batches = [batch.pin_memory() for batch in batches]
    with torch.inference_mode(), autocast_for(clip.device):
        for batch in batches[:1] + batches[-1:]:  # warm-up: first kernels, shortest and longest shapes
            clip_encode_text(clip, batch.to(clip.device), short_context=short)
        synchronize(part.device)
        started = time.perf_counter()
        for batch in batches:
            clip_encode_text(clip, batch.to(clip.device, non_blocking=True), short_context=short)
        synchronize(part.device)
        seconds = time.perf_counter() - started
    precision = "fp16 autocast" if clip.device.type == "cuda" else f"fp32, {torch.get_num_threads()} threads"
    part.emit(f"{part['arch']} text tower alone", len(prompts) / seconds, "prompts/s",
              f"{len(prompts):,} pre-tokenized prompts, {'length-bucketed (short context)' if short else 'padded to 77'}"
              f" batches of {batch_size}, mean {lengths.float().mean():.1f} tokens, {precision}, host→device copy "
              f"included, {seconds:.2f} s")


# ------------------------------------------------------------------------------------------ (a) build
def img2prompt_command(*args: str) -> list[str]:
    """The `img2prompt` command of this interpreter (`python -m img2prompt`: no console script needed)."""
    return [sys.executable, "-m", "img2prompt", *map(str, args)]


def run_bounded(command: list[str], log: Path, seconds: float) -> tuple[int | None, float, str]:
    """(exit code or None when stopped at `seconds`, wall seconds, stdout) of `command`; stderr goes to `log`."""
    started = time.perf_counter()
    with open(log, "wb") as errors:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=errors, start_new_session=True)
        try:
            out, _ = process.communicate(timeout=max(1.0, seconds))
            return process.returncode, time.perf_counter() - started, out.decode(errors="replace")
        except subprocess.TimeoutExpired:
            stop_group(process)
            return None, time.perf_counter() - started, ""


def stop_group(process: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(process.pid, sig)
            process.wait(wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def last_progress(log: Path) -> tuple[int, int] | None:
    """The last (done, total) that the build's progress bar printed."""
    found = PROGRESS.findall(log.read_text(encoding="utf-8", errors="replace")[-20000:]) if log.is_file() else []
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def build_command(part: Part, corpus: Path, out: Path) -> list[str]:
    return img2prompt_command("build", corpus, "--out", out, "--clip-model", f"local-dir:{part.clip_dir}",
                              "--text-model", part.minilm_dir, "--device", part.device,
                              "--batch-size", part["batch_size"], "--index", "flat", "--overwrite", "--json")


def build_part(part: Part) -> None:
    log = part.work / "build.log"
    code, wall, out = run_bounded(build_command(part, part.corpus, part.index_dir), log, part.left())
    if code is None:
        done = last_progress(log)
        seen = f"{done[0]:,} of {done[1]:,} prompts encoded" if done else "no progress line seen"
        part.emit("build end to end: HIT ITS CAP", done[0] / wall if done else "-", "prompts/s",
                  f"stopped after {wall:.0f} s, {seen} (rate over the whole wall time, model load included)")
        return
    if code != 0:
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-1:] if log.is_file() else []
        raise RuntimeError(f"img2prompt build exited {code}: {tail[0][:300] if tail else 'no output'}")
    summary = json.loads(out[out.index("{"):])
    count, timings = summary["count"], summary.get("timings_s", {})
    phases = ", ".join(f"{name} {value:.1f}" for name, value in timings.items())
    part.emit(f"build end to end ({part['arch']} + MiniLM-shaped)", count / wall, "prompts/s",
              f"`img2prompt build` wall {wall:.1f} s incl. start-up and model load, {count:,} prompts, batch "
              f"{part['batch_size']}, --index flat, {part.device}; phases s: {phases}")
    rate = summary.get("rates", {}).get("prompts_per_s")
    part.emit("build encode rate (as the build reports it)", float(rate) if rate else "-", "prompts/s",
              "the manifest's rates.prompts_per_s: tokenizing workers + CLIP text tower + MiniLM, no model load")
    for phase, what in (("encode_clip", "CLIP text (r_clip)"), ("encode_minilm", "MiniLM, fp32 (r_minilm)")):
        if timings.get(phase):
            part.emit(f"build {what} phase", count / timings[phase], "prompts/s",
                      f"{count:,} prompts / the build timer's {phase} {timings[phase]:.1f} s")


# ------------------------------------------------------------------------------------------ (b) image
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


def image_tower(part: Part) -> None:
    import torch
    from PIL import Image

    from img2prompt.encoders.models import clip_encode_image
    from img2prompt.encoders.precision import autocast_for

    clip = load_clip_folder(part)
    shape = tuple(clip.preprocess(Image.new("RGB", (512, 512))).shape)
    batch = part["image_batch"]
    pixels = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(0))
    if clip.device.type == "cuda":
        pixels = pixels.pin_memory()
    with torch.inference_mode(), autocast_for(clip.device):
        for _ in range(2):  # warm-up
            clip_encode_image(clip, pixels.to(clip.device))
        synchronize(part.device)
        done, started = 0, time.perf_counter()
        while done < 3 * batch or time.perf_counter() - started < part["image_seconds"]:
            clip_encode_image(clip, pixels.to(clip.device, non_blocking=True))
            done += batch
            if done % (8 * batch) == 0:
                synchronize(part.device)  # bound the queue, so the clock sees the work
        synchronize(part.device)
        seconds = time.perf_counter() - started
    precision = "fp16 autocast" if clip.device.type == "cuda" else f"fp32, {torch.get_num_threads()} threads"
    part.emit(f"{part['arch']} image tower alone", done / seconds, "img/s",
              f"synthetic preprocessed pixels {shape[1]}×{shape[2]}, batch {batch}, {precision}, host→device copy "
              f"included, {done:,} images in {seconds:.1f} s")


def image_part(part: Part) -> None:
    image_tower(part)
    release_memory()
    if not (part.index_dir / "manifest.json").is_file():
        part.emit("submission() end to end", "skipped", "-", "no index: the build part did not finish")
        return
    if part.left() < 30:
        part.emit("submission() end to end", "skipped", "-", f"{part.left():.0f} s left of the part's cap")
        return
    import img2prompt

    images = part.work / "images"
    kib = write_images(images, part["submit_images"])
    started = time.perf_counter()
    with img2prompt.open_index(part.index_dir, device=part.device) as index:
        opened = time.perf_counter() - started
        started = time.perf_counter()
        report = index.submission(images, part.work / "submission.csv", batch_size=part["image_batch"])
        seconds = time.perf_counter() - started
        count = index.count
    timings = ", ".join(f"{name} {value:.2f}" for name, value in report.timings_s.items())
    part.emit("submission() end to end (decode + tower + search + blend + CSV)",
              part["submit_images"] / seconds, "img/s",
              f"{part['submit_images']:,} generated 512×512 PNGs (~{kib:.0f} KiB, {DISTINCT_IMAGES} distinct), "
              f"batch {part['image_batch']}, default decode workers (spawned), index of {count:,} prompts; "
              f"open_index {opened:.1f} s not counted; phases s: {timings}")


# ------------------------------------------------------------------------------------------ (c, e) search
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


def search_data(part: Part):
    """(vectors, queries, seconds to make them): clustered fp16 unit vectors at the CLIP model's dim."""
    from common import held_out_queries

    config = json.loads((part.clip_dir / "open_clip_config.json").read_text())
    dim = int(config["model_cfg"]["embed_dim"])
    started = time.perf_counter()
    vectors = clustered_torch(part["search_rows"], dim, part.device.split(",")[0])
    queries = held_out_queries(vectors, max(part["torch_queries"], part["faiss_queries"]))
    return vectors, queries, time.perf_counter() - started


def torch_cases(part: Part, vectors, queries, cases, reference=None):
    """Times each (label, device, budget) case; returns the first case's ids."""
    import numpy as np

    count = part["torch_queries"]
    shape = f"{len(vectors):,}×{vectors.shape[1]}"
    for label, device, budget in cases:
        if part.left() < 15:
            part.emit(f"torch exact {label}", "skipped", "-", f"{part.left():.0f} s left of the part's cap")
            continue
        ids, seconds, load, resident = time_torch(vectors, queries[:count], device, budget)
        reference = ids if reference is None else reference
        part.emit(f"torch exact {label}, {shape}", count / seconds, "queries/s",
                  f"{count:,} queries, k 10, {device}; rows to the device {load:.1f} s (not counted), resident "
                  f"rows {resident:,}; ids equal to the one-device resident case's {np.mean(ids == reference):.4f}")
    return reference


def search_part(part: Part) -> None:
    import faiss
    import numpy as np

    from img2prompt.index.backend import backend_class
    from img2prompt.index.recall import recall_at_k

    vectors, queries, made = search_data(part)
    part.emit("search data made", made, "s", f"{len(vectors):,}×{vectors.shape[1]} fp16 clustered unit vectors "
                                             f"(torch on {part.device.split(',')[0]}), held-out queries")
    streamed = "pinned host buffers" if part.device.startswith("cuda") else "float32 read-ahead buffers"
    reference = torch_cases(part, vectors, queries, [("resident", part.device, None),
                                                     (f"streamed ({streamed}, 0 resident)", part.device, 0)])
    if reference is not None:
        np.save(part.work / "search_ids.npy", reference)
    count = part["faiss_queries"]
    flat = backend_class("flat")(vectors, {})
    started = time.perf_counter()
    exact = flat.search(queries[:count], 10)[1]
    seconds = time.perf_counter() - started
    part.emit(f"faiss-cpu flat (exact), {len(vectors):,}×{vectors.shape[1]}", count / seconds, "queries/s",
              f"{count:,} queries, k 10, {faiss.omp_get_max_threads()} threads, index/flat.py (fp16 read ahead "
              f"into fp32 buffers)")
    if reference is not None:
        part.emit("torch exact recall@10 vs faiss flat", f"{recall_at_k(reference[:count], exact):.4f}", "recall",
                  f"on the first {count:,} held-out queries (1.0000: the same top 10)")


def two_gpu_part(part: Part) -> None:
    import numpy as np

    spec = part["two_gpu_device"]
    if spec.startswith("cuda"):
        import torch

        found = torch.cuda.device_count()
        if found < 2:
            part.emit("search split over two GPUs", "skipped", "-", f"torch sees {found} GPU(s); needs 2")
            return
    vectors, queries, _ = search_data(part)
    saved = part.work / "search_ids.npy"
    reference = np.load(saved) if saved.is_file() else None
    label = "smoke: cpu,cpu (no GPUs)" if spec.startswith("cpu") else spec
    torch_cases(part, vectors, queries, [(f"split over {label}, resident", spec, None),
                                         (f"split over {label}, streamed (0 resident)", spec, 0)], reference)


# ------------------------------------------------------------------------------------------ (d) serve
def query_image(part: Part) -> tuple[str, bytes]:
    """A Kaggle sample image (--images-dir) when there is one, else a generated 512×512 PNG."""
    found = sorted(Path(part["images_dir"]).glob("*.png")) if part["images_dir"] else []
    if found:
        return found[0].name, found[0].read_bytes()
    write_images(part.work / "query-image", 1)
    path = part.work / "query-image" / "000000.png"
    return "generated.png", path.read_bytes()


def serve_index(part: Part) -> tuple[Path, str]:
    """The build part's index when it finished, else a small one built here."""
    if (part.index_dir / "manifest.json").is_file():
        return part.index_dir, "the build part's index"
    corpus = part.work / "serve-corpus.txt"
    lines = part.corpus.read_text(encoding="utf-8").splitlines()[:part["serve_prompts"]]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = part.work / "serve-index"
    code, wall, _ = run_bounded(build_command(part, corpus, out), part.work / "serve-build.log", part.left() - 30)
    if code != 0:
        raise RuntimeError(f"the serve part's index build {'hit the cap' if code is None else f'exited {code}'}")
    return out, f"a {len(lines):,}-prompt index built here ({wall:.0f} s)"


def start_server(part: Part, index_dir: Path, merge_items: int | None, log: Path):
    from serve_load import free_port

    port = free_port()
    command = img2prompt_command("serve", index_dir, "--port", port, "--device", part.device, "-q")
    if merge_items is not None:
        command += ["--merge-items", str(merge_items)]
    with open(log, "wb") as errors:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=errors, start_new_session=True)
    return process, f"http://127.0.0.1:{port}"


def wait_ready(part: Part, process: subprocess.Popen, url: str, log: Path) -> None:
    import httpx

    while part.left() > 0:
        if process.poll() is not None:
            tail = log.read_text(errors="replace").strip().splitlines()[-1:]
            raise RuntimeError(f"the server exited ({process.returncode}): {tail[0][:300] if tail else ''}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise TimeoutError("the server did not become ready before the part's cap")


def serve_part(part: Part) -> None:
    from serve_load import load, percentile

    index_dir, source = serve_index(part)
    name, data = query_image(part)
    modes = [("one encoder call per request (--merge-items 1)", 1), ("merged encoder calls (default limits)", None)]
    # both servers start together (their model loads overlap); each is loaded alone, the other idle
    servers = [start_server(part, index_dir, items, part.work / f"serve-{items or 'merged'}.log")
               for _, items in modes]
    rates = []
    try:
        for (label, items), (process, url) in zip(modes, servers):
            wait_ready(part, process, url, part.work / f"serve-{items or 'merged'}.log")
        for (label, items), (process, url) in zip(modes, servers):
            result = asyncio.run(load(url, part["serve_clients"], part["serve_seconds"], "image", name, data, 10))
            latencies, stats = result["latencies"], result["stats"]
            rate = len(latencies) / result["elapsed"]
            rates.append((rate, percentile(latencies, 0.99)))
            errors = sum(result["errors"].values())
            conditions = (f"{part['serve_clients']} clients × {result['elapsed']:.1f} s, image {name} "
                          f"({len(data) / 1024:.0f} KiB), k 10, {part['arch']} on {part.device}, {source}")
            part.emit(f"serve, {label}", rate, "requests/s",
                      conditions + f"; {len(latencies)} answered, {errors} errors; {stats.get('encoder_calls', 0)} "
                                   f"merged encoder calls served {stats.get('merged_requests', 0)} requests")
            part.emit(f"serve, {label}: latency p50 / p99", f"{1000 * percentile(latencies, 0.5):,.0f} / "
                      f"{1000 * percentile(latencies, 0.99):,.0f}", "ms", "same run")
    finally:
        for process, _ in servers:
            stop_group(process)
    if len(rates) == 2:
        (alone, alone_p99), (merged, merged_p99) = rates
        part.emit("serve, merged / one call per request", merged / max(alone, 1e-9), "× requests/s",
                  f"p99 {1000 * merged_p99:,.0f} vs {1000 * alone_p99:,.0f} ms (issue 34 target: ≥ 1.5×, p99 no worse)")


# ------------------------------------------------------------------------------------------ main
PARTS = {"prepare": prepare_part, "tower": tower_part, "build": build_part, "image": image_part,
         "search": search_part, "serve": serve_part, "two-gpu": two_gpu_part}


def main(argv: list[str]) -> int:
    if len(argv) != 4 or argv[1] not in PARTS:
        print(__doc__, file=sys.stderr)
        return 2
    part = Part(argv[1], json.loads(Path(argv[2]).read_text()), float(argv[3]))
    try:
        PARTS[part.name](part)
    except BaseException as exc:  # the parent names the failure in the table; the traceback goes to the log
        traceback.print_exc()
        part.emit("FAILED", "-", "-", f"{type(exc).__name__}: {str(exc)[:300]}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
