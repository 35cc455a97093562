"""POST /admin/reload: the server re-opens its index from its path and serves the new one (after an add)."""
from __future__ import annotations

import gc
import shutil
import sys
import threading
import weakref
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed")
from fastapi.testclient import TestClient  # noqa: E402

import img2prompt  # noqa: E402
from serve_fixtures import GatedIndex, create_app  # noqa: E402


@pytest.fixture(scope="module")
def small_index(tmp_path_factory, tiny_clip_dir, corpus_file, text_model) -> Path:
    """A second, smaller index of the same models: what the folder holds after it changed."""
    from img2prompt.build_index.runner import BuildOptions, run_build

    corpus = tmp_path_factory.mktemp("small") / "prompts.txt"
    corpus.write_text("\n".join(corpus_file.read_text(encoding="utf-8").splitlines()[:40]) + "\n", encoding="utf-8")
    out = corpus.parent / "idx"
    run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(tiny_clip_dir),
                           shard_size=64, batch_size=32, device="cpu", progress=False))
    return out


@pytest.fixture
def served(tmp_path, built_index) -> Path:
    """A copy of the built index at the path the server serves (the tests replace or damage it)."""
    path = tmp_path / "served"
    shutil.copytree(built_index, path)
    return path


def replace_folder(path: Path, source: Path) -> None:
    shutil.rmtree(path)
    shutil.copytree(source, path)


def reopen(path: Path):
    return lambda: img2prompt.open_index(path, device="cpu")


def count_of(client: TestClient, **headers) -> int:
    return client.get("/health", headers=headers).json()["count"]


def text_search(client: TestClient, **headers):
    return client.post("/search", json={"text": "a castle on a hill", "k": 3}, headers=headers)


@pytest.mark.slow  # builds a second index
def test_reload_serves_the_new_index(served, small_index):
    with img2prompt.open_index(served, device="cpu") as old:
        big = old.count
        with TestClient(create_app(old, reopen=reopen(served))) as client:
            before = text_search(client).json()
            replace_folder(served, small_index)
            assert count_of(client) == big  # nothing changes until the reload
            answer = client.post("/admin/reload")
            assert answer.status_code == 200, answer.text
            with img2prompt.open_index(small_index, device="cpu") as small:
                assert answer.json() == {"count": small.count, "previous": big}
                expected = [result.to_dict() for result in small.search_texts(["a castle on a hill"], 3)]
            assert small.count < big
            assert count_of(client) == small.count
            after = text_search(client).json()
            assert after == expected and after != before
            assert all(hit["id"] < small.count for hit in after[0]["results"])


def test_reload_needs_the_key(served):
    with img2prompt.open_index(served, device="cpu") as old:
        with TestClient(create_app(old, api_key="s3cret", reopen=reopen(served))) as client:
            assert client.post("/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
            assert client.post("/admin/reload").status_code == 401
            answer = client.post("/admin/reload", headers={"X-API-Key": "s3cret"})
            assert answer.status_code == 200 and answer.json() == {"count": old.count, "previous": old.count}


def test_keyless_reload_only_on_loopback(served):
    with img2prompt.open_index(served, device="cpu") as old:
        app = create_app(old, host="0.0.0.0", reopen=reopen(served))
        with TestClient(app) as client:
            answer = client.post("/admin/reload")
            assert answer.status_code == 403 and "API key" in answer.json()["detail"]


@pytest.mark.parametrize("damage", ["manifest", "half-written"])
def test_damaged_index_keeps_the_old_one(served, damage):
    with img2prompt.open_index(served, device="cpu") as old:
        with TestClient(create_app(old, reopen=reopen(served))) as client:
            before = text_search(client).json()
            if damage == "manifest":
                (served / "manifest.json").write_text('{"state": "comp', encoding="utf-8")
            else:  # a build stopped half-way: files without their manifest
                (served / "manifest.json").unlink()
            answer = client.post("/admin/reload")
            assert answer.status_code == 409, answer.text
            assert answer.json()["detail"].startswith("reload failed, still serving the previous index")
            assert count_of(client) == old.count
            assert text_search(client).json() == before


@pytest.mark.slow  # builds a second index
def test_request_in_flight_finishes_on_the_old_index(served, small_index):
    with img2prompt.open_index(served, device="cpu") as opened:
        gated = GatedIndex(opened)
        expected_old = [result.to_dict() for result in opened.search_texts(["a castle on a hill"], 3)]
        with TestClient(create_app(gated, reopen=reopen(served))) as client:
            answers = {}
            thread = threading.Thread(target=lambda: answers.update(old=text_search(client)))
            thread.start()
            assert gated.entered.wait(60)  # the search is running on the old index, held at the gate
            queued = threading.Thread(target=lambda: answers.update(queued=text_search(client)))
            queued.start()  # a second request, queued behind the first before the reload
            for _ in range(6000):
                if client.app.state.worker.pending == 1:
                    break
                threading.Event().wait(0.01)
            assert client.app.state.worker.pending == 1
            replace_folder(served, small_index)
            reloaded = client.post("/admin/reload")
            assert reloaded.status_code == 200 and reloaded.json()["previous"] == opened.count
            gated.gate.set()
            thread.join(60)
            queued.join(60)
            assert answers["old"].status_code == 200 and answers["old"].json() == expected_old
            assert answers["queued"].status_code == 200 and answers["queued"].json() == expected_old
            assert count_of(client) == reloaded.json()["count"] < opened.count


def _rss_mib() -> float:
    with open("/proc/self/status", encoding="ascii") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


@pytest.mark.slow  # 230 reloads, each loading the (tiny) CLIP model again
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the RSS from /proc/self/status")
def test_reloads_release_the_old_index(served):
    """Each reload drops the previous index at once (by reference count alone, with the cycle collector off:
    a reference cycle held every old session, its models and memmaps until a full gc pass, and a server
    grew ~13 MiB per reload), and after a warm-up, 200 more reloads leave the memory flat."""
    warm_up, reloads = 30, 200
    with img2prompt.open_index(served, device="cpu") as first:
        app = create_app(first, reopen=reopen(served))
        with TestClient(app) as client:
            gc.collect()
            gc.disable()
            try:
                for number in range(warm_up + reloads):
                    if number == warm_up:
                        start = _rss_mib()
                    old = app.state.serve.index
                    session, clip = weakref.ref(old.session), weakref.ref(old.session.clip)
                    assert text_search(client).status_code == 200  # a job that held the old index
                    del old
                    assert client.post("/admin/reload").status_code == 200
                    if number:  # the first one is the caller's index (it holds it)
                        assert session() is None and clip() is None, f"reload {number} kept the old index alive"
                grown = _rss_mib() - start
            finally:
                gc.enable()
    # one tiny-CLIP index is a few MiB, the leak was ~13 MiB a reload; 64 MiB is allocator noise, not 200 indexes
    assert grown < 64, f"{reloads} reloads grew the process by {grown:.0f} MiB"
