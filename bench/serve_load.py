"""Load on `img2prompt serve`: N concurrent clients (default 32) POST an image to /search on 127.0.0.1 for a
bounded time (default 10 s); prints requests/s, p50/p99 latency and errors, against the in-process search
rate (`index.search_images`, one image per call, same index, same image) measured first in the same run.

    python bench/serve_load.py [--index DIR] [--clients 32] [--seconds 10] [--query image|text] [--device cpu]
    python bench/serve_load.py --worst      # peak server RSS under the largest requests the limits allow
    python bench/serve_load.py --architecture ViT-B-32 --clients 16 --compare-merging   # merged encoder calls
                                            # vs one call per request (--merge-items 1), same index, one run

Without --index, an index of the first --prompts prompts of data/prompts.txt is built here with the tiny
stand-in CLIP (`img2prompt.stand_in`): encoding is then nearly free, so the figures show the server's own
cost (HTTP, multipart, decoding, queueing); pass an index built with real weights for model-bound figures.
The server runs in a child process (`img2prompt.serve.runner.serve`, as the command runs it), the clients are
asyncio + httpx in this one. It asserts nothing.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import REPO, add_device_flag, check_device

SAMPLE_IMAGES = REPO.parent / "shared" / "kaggle-sample" / "images"
TEXT = "a castle on a hill at sunset, highly detailed, matte painting"


def build_index(folder: Path, prompts: int, device: str, architecture: str | None = None) -> Path:
    import img2prompt
    from img2prompt.stand_in import write_random_clip, write_tiny_clip

    corpus = folder / "prompts.txt"
    lines = (REPO / "data" / "prompts.txt").read_text(encoding="utf-8").splitlines()[:prompts]
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    clip = (write_random_clip(folder / "clip", architecture, seed=0) if architecture
            else write_tiny_clip(folder / "clip", seed=0))
    img2prompt.build(str(corpus), folder / "index", clip_model=str(clip), device=device, progress=False)
    return folder / "index"


def query_image(folder: Path) -> tuple[str, bytes]:
    """A Kaggle sample image when ../shared is present, else a generated 512×512 PNG."""
    found = sorted(SAMPLE_IMAGES.glob("*.png"))
    if found:
        return found[0].name, found[0].read_bytes()
    import io

    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)).save(buffer, "PNG")
    return "generated.png", buffer.getvalue()


def in_process_rates(index_dir: Path, device: str, data: bytes, query: str, k: int, seconds: float) -> dict:
    """Searches/s through the Python API, one query per call, sequential: what one request costs without the
    server. Measured on a fresh thread (as the server's model worker calls it) and on the main thread: with
    torch's 2 OpenMP threads on a busy 2-core machine, small models ran ~30× slower on the main thread here."""
    import io
    import threading

    import img2prompt
    from PIL import Image

    with img2prompt.open_index(index_dir, device=device) as index:
        call = ((lambda: index.search_texts([TEXT], k)) if query == "text"
                else (lambda: index.search_images([Image.open(io.BytesIO(data))], k)))  # decoding included, as served

        def rate() -> float:
            call()  # warm-up
            done, started = 0, time.perf_counter()
            while time.perf_counter() - started < seconds:
                call()
                done += 1
            return done / (time.perf_counter() - started)

        rates: dict[str, float] = {}
        thread = threading.Thread(target=lambda: rates.update(thread=rate()))
        thread.start()
        thread.join()
        rates["main"] = rate()
        return rates


def rss_mib(pid: int) -> tuple[float, float]:
    """(current, peak) resident memory of a process in MiB, from /proc (Linux)."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def worst_requests(count: int) -> list[tuple[str, dict]]:
    """The largest requests the default ServeLimits let through, and the one of the issue that they refuse."""
    import io

    from PIL import Image

    from img2prompt.serve.limits import ServeLimits

    limits = ServeLimits()
    k = min(limits.max_k, count)
    # texts: max_batch texts of max_text_chars characters (under the JSON limit), k as high as allowed
    text = (TEXT + ", ") * (limits.max_text_chars // (len(TEXT) + 2) + 1)
    texts = {"json": {"text": [text[:limits.max_text_chars]] * limits.max_batch, "k": k}}
    # images: 1-bit PNGs a few KB each whose decoded size sums to the per-request bound (each at its own bound)
    side = int((limits.max_decoded_image / 4) ** 0.5)
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, format="PNG", optimize=True)
    per_request = max(1, limits.max_decoded_request // (side * side * 4))
    images = {"files": [("image", (f"big{i}.png", buffer.getvalue(), "image/png")) for i in range(per_request)],
              "data": {"k": str(k)}}
    refused = {"json": {"text": [f"p{i}" for i in range(100_000)], "k": 300}}
    return [(f"{limits.max_batch} texts × {limits.max_text_chars} chars, k {k}", texts),
            (f"{per_request} images of {side}×{side} ({len(buffer.getvalue()) / 1024:.0f} KiB each, "
             f"{limits.max_decoded_request / 2**20:.0f} MiB decoded in all), k {k}", images),
            ("the issue's {\"text\": [100k strings], \"k\": 300} (refused)", refused)]


def run_worst(url: str, pid: int, count: int) -> None:
    import httpx

    print(f"server RSS when ready: {rss_mib(pid)[0]:.0f} MiB")
    for label, request in worst_requests(count):
        started = time.perf_counter()
        response = httpx.post(url + "/search", timeout=300, **request)
        current, peak = rss_mib(pid)
        print(f"{label}: HTTP {response.status_code} in {time.perf_counter() - started:.2f} s; "
              f"server RSS now {current:.0f} MiB, peak so far {peak:.0f} MiB")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def load(url: str, clients: int, seconds: float, query: str, name: str, data: bytes, k: int) -> dict:
    import httpx

    latencies: list[float] = []
    errors: dict[str, int] = {}
    deadline = time.perf_counter() + seconds

    async def client(http: httpx.AsyncClient) -> None:
        while time.perf_counter() < deadline:
            started = time.perf_counter()
            try:
                if query == "text":
                    response = await http.post(url + "/search", json={"text": TEXT, "k": k})
                else:
                    response = await http.post(url + "/search", files={"image": (name, data, "image/png")},
                                               data={"k": str(k)})
                ok = response.status_code == 200 and len(response.json()[0]["results"]) == k
                reason = None if ok else f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                reason = type(exc).__name__
            if reason:
                errors[reason] = errors.get(reason, 0) + 1
            else:
                latencies.append(time.perf_counter() - started)

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        elapsed = time.perf_counter() - started
        stats = (await http.get(url + "/health")).json()["queue"]
    return {"latencies": sorted(latencies), "errors": errors, "elapsed": elapsed, "stats": stats}


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"the server exited ({process.returncode}): {process.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    sys.exit("the server did not become ready")


def percentile(values: list[float], fraction: float) -> float:
    return values[min(len(values) - 1, int(round(fraction * (len(values) - 1))))] if values else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--index", type=Path, help="a built index (default: build a stand-in one here)")
    parser.add_argument("--prompts", type=int, default=500, help="prompts in the stand-in index (default 500)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default 32)")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long the clients run (default 10)")
    parser.add_argument("--query", choices=["image", "text"], default="image", help="what each request sends")
    parser.add_argument("--k", type=int, default=10, help="results per request (default 10)")
    parser.add_argument("--worst", action="store_true",
                        help="instead of the load: send the largest allowed requests once each, print peak RSS")
    parser.add_argument("--architecture", metavar="NAME",
                        help="build the index with this open_clip architecture at real size, random weights "
                             "(e.g. ViT-B-32), instead of the tiny stand-in: model-bound figures")
    parser.add_argument("--compare-merging", action="store_true",
                        help="run the load twice in this run: one encoder call per request (--merge-items 1), "
                             "then merged calls (the default limits)")
    add_device_flag(parser)
    args = parser.parse_args()
    check_device(args.device)

    with tempfile.TemporaryDirectory(prefix="serve-load-") as temp:
        temp = Path(temp)
        os.environ.setdefault("IMG2PROMPT_CACHE_DIR", str(temp / "cache"))
        index_dir = args.index or build_index(temp, args.prompts, args.device, args.architecture)
        name, data = query_image(temp)
        rates = None if args.worst else in_process_rates(index_dir, args.device, data, args.query, args.k,
                                                          min(args.seconds, 5.0))

        if args.worst:
            run_server(index_dir, args, None, worst=True)
            return
        runs = [("one encoder call per request (--merge-items 1)", 1)] if args.compare_merging else []
        runs.append(("merged encoder calls (default limits)", None))
        results = [(label, run_server(index_dir, args, merge_items, name=name, data=data)) for label, merge_items in runs]

    query = f"text {TEXT[:30]!r}…" if args.query == "text" else f"image {name} ({len(data) / 1024:.0f} KiB)"
    source = args.architecture or "stand-in"
    print(f"index {index_dir if args.index else f'{source}, random weights, {args.prompts} prompts'}; "
          f"device {args.device}; {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.1f}; k {args.k}; {query}")
    rate = rates["thread"]
    print(f"in-process (Python API, one query per call, sequential, on a thread like the server's worker): "
          f"{rate:.1f} searches/s ({1000 / rate:.1f} ms each); on the main thread {rates['main']:.1f}/s")
    for label, result in results:
        latencies, stats = result["latencies"], result["stats"]
        served = len(latencies) / result["elapsed"]
        print(f"server, {label}, {args.clients} clients × {result['elapsed']:.1f} s on 127.0.0.1: "
              f"{len(latencies)} answered, {served:.1f} requests/s; latency p50 "
              f"{1000 * percentile(latencies, 0.5):.0f} ms, p99 {1000 * percentile(latencies, 0.99):.0f} ms; errors "
              f"{sum(result['errors'].values())}"
              + (f" ({', '.join(f'{reason} × {count}' for reason, count in result['errors'].items())})"
                 if result["errors"] else ""))
        print(f"  {stats['requests']} requests, {stats.get('encoder_calls', 0)} merged encoder calls serving "
              f"{stats.get('merged_requests', 0)} of them; server / in-process rate {served / rate:.2f}×")
    if len(results) == 2:
        (_, alone), (_, merged) = results
        ratio = (len(merged["latencies"]) / merged["elapsed"]) / max(1e-9, len(alone["latencies"]) / alone["elapsed"])
        print(f"merged / one call per request: {ratio:.2f}× requests/s; p99 "
              f"{1000 * percentile(merged['latencies'], 0.99):.0f} vs {1000 * percentile(alone['latencies'], 0.99):.0f} ms")


def run_server(index_dir: Path, args, merge_items: int | None, *, worst: bool = False, name: str = "",
               data: bytes = b"") -> dict | None:
    """Serve `index_dir` in a child process (merge_items: that limit, None: the defaults) and load it."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    code = ("import sys; from img2prompt.serve.runner import serve; from img2prompt.serve.limits import ServeLimits; "
            "limits = ServeLimits(merge_items=int(sys.argv[4])) if sys.argv[4] else None; "
            "serve(sys.argv[1], port=int(sys.argv[2]), device=sys.argv[3], limits=limits, log_level='warning')")
    server = subprocess.Popen([sys.executable, "-c", code, str(index_dir), str(port), args.device,
                               "" if merge_items is None else str(merge_items)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        wait_ready(url, server)
        if worst:
            import httpx

            run_worst(url, server.pid, httpx.get(url + "/health").json()["count"])
            return None
        return asyncio.run(load(url, args.clients, args.seconds, args.query, name, data, args.k))
    finally:
        server.terminate()
        server.wait(30)


if __name__ == "__main__":
    main()
