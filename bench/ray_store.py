"""`build --engine ray` to a local folder vs to s3:// (moto's server on loopback), in one run (issue #23): wall
seconds of each build, and what the store path adds per shard (the workers' upload, the driver's download +
sha256 check), with the bytes each shard holds.

    python bench/ray_store.py --prompts 2000 --shard-size 250 --workers 2

Stand-in CLIP (random weights) + real MiniLM on CPU actors; moto keeps objects in memory, so the store's cost
here is the S3 protocol and the copies, not a network. Prints figures; asserts nothing about speed.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import socket
import tempfile
import time
from pathlib import Path

from common import real_prompts


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000)
    parser.add_argument("--shard-size", type=int, default=250)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()

    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    work = Path(tempfile.mkdtemp(prefix="ray-store-bench-"))
    # every process (this driver, the Ray workers it starts) reads the endpoint from its environment
    os.environ.update({"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
                       "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3": json.dumps({"endpoint_url": endpoint}),
                       "IMG2PROMPT_CACHE_DIR": str(work / "cache")})
    import boto3
    import ray

    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.index.layout import CLIP_VECTORS, MINILM, PROMPTS
    from img2prompt.stand_in import write_tiny_clip

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's request log
    boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket="bench")
    corpus = work / "prompts.txt"
    corpus.write_text("\n".join(real_prompts(args.prompts)) + "\n", encoding="utf-8")
    clip = write_tiny_clip(work / "tiny-clip", seed=0)
    ray.init(address="local", num_cpus=args.workers, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    try:
        for label, out in (("local folder", str(work / "idx")), ("s3:// (moto)", "s3://bench/idx")):
            options = BuildOptions(corpus=[str(corpus)], out=out, clip_model=str(clip), shard_size=args.shard_size,
                                   batch_size=64, device="cpu", progress=False, engine="ray", workers=args.workers)
            started = time.perf_counter()
            result = run_build(options)
            wall = time.perf_counter() - started
            timings = result.timings
            shards = len(result.manifest.get("shards", [])) or -(-result.manifest["count"] // args.shard_size)
            print(f"{label:14s} {result.manifest['count']} prompts, {shards} shards: {wall:.1f} s wall; "
                  f"send {timings.get('send_shard', 0):.2f} s, receive {timings.get('receive_shard', 0):.2f} s "
                  f"(summed over shards), encode_minilm {timings.get('encode_minilm', 0):.1f} s")
            if label == "local folder":  # the shards are gone once consolidated: their rows are these files
                shard_bytes = sum((work / "idx" / name).stat().st_size
                                  for name in (CLIP_VECTORS, MINILM, PROMPTS)) / shards
        print(f"shard files: about {shard_bytes / 1024:.0f} KiB a shard")
    finally:
        ray.shutdown()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
