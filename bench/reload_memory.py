"""RSS of a server over repeated POST /admin/reload (issue 30 item 9), the cycle collector left as it runs
by default: prints MiB per reload after a warm-up. Measures; asserts nothing.

    python bench/reload_memory.py --reloads 100
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=100)
    parser.add_argument("--warm-up", type=int, default=10)
    parser.add_argument("--prompts", type=int, default=60)
    args = parser.parse_args()
    from fastapi.testclient import TestClient

    import img2prompt
    from img2prompt.serve import app as serve
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.stand_in import write_tiny_clip

    tmp = Path(tempfile.mkdtemp(prefix="reload-bench-"))
    corpus = tmp / "prompts.txt"
    corpus.write_text("\n".join((REPO / "data" / "prompts.txt").read_text("utf-8").splitlines()[:args.prompts]) + "\n")
    clip = write_tiny_clip(tmp / "clip", seed=0)
    run_build(BuildOptions(corpus=[str(corpus)], out=str(tmp / "idx"), clip_model=str(clip), device="cpu",
                           progress=False))
    with img2prompt.open_index(tmp / "idx", device="cpu") as index:
        app = serve.create_app(index, allowed_hosts=("testserver",),
                               reopen=lambda: img2prompt.open_index(tmp / "idx", device="cpu"))
        with TestClient(app) as client:
            for number in range(args.warm_up + args.reloads):
                if number == args.warm_up:
                    start = rss_mib()
                assert client.post("/admin/reload").status_code == 200
                if number % 10 == 0:
                    print(f"reload {number}: RSS {rss_mib():,.0f} MiB", flush=True)
            grown = rss_mib() - start
    print(f"{args.reloads} reloads after {args.warm_up} warm-up: +{grown:,.0f} MiB, "
          f"{grown / args.reloads:.2f} MiB per reload")


if __name__ == "__main__":
    sys.exit(main())
