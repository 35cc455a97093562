"""build --near-dup: the streaming filter on hand-made vectors with known cosines, and IVF vs brute force."""
import numpy as np
import pytest

from build_index.near_dup import NearDupFilter, near_dup_mask
from img2prompt.errors import UserError


def unit(*rows):
    a = np.asarray(rows, dtype=np.float32)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def test_first_kept_wins_across_batches():
    f = NearDupFilter(0.9, 2)
    assert f.feed(unit([1, 0])).tolist() == [True]
    # cos([1,0],[1,0.1]) = 0.995 → dropped; [0,1] is far → kept
    assert f.feed(unit([1, 0.1], [0, 1])).tolist() == [False, True]
    assert f.stats.dropped == 1 and f.stats.seen == 3


def test_within_batch_only_against_kept_rows():
    # b near a (drop), c near b but not a: b was dropped, so c stays (compared with KEPT rows only)
    a, b, c = [1, 0], [np.cos(0.3), np.sin(0.3)], [np.cos(0.6), np.sin(0.6)]
    mask, stats = near_dup_mask(unit(a, b, c), float(np.cos(0.35)))
    assert mask.tolist() == [True, False, True] and stats.dropped == 1


def test_threshold_boundary_is_inclusive():
    v = unit([1, 0], [0.8, 0.6])
    cos = float((v[0] @ v[1]))
    assert near_dup_mask(v, cos)[0].tolist() == [True, False]
    assert near_dup_mask(v, float(np.nextafter(np.float32(cos), np.float32(2))))[0].tolist() == [True, True]


def test_refuses_nan_and_zero_and_bad_threshold():
    with pytest.raises(UserError, match="row 1 has a NaN or zero"):
        near_dup_mask(np.array([[1, 0], [0, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match="row 0"):
        near_dup_mask(np.array([[np.nan, 0]], np.float32), 0.9)
    with pytest.raises(UserError, match=r"\(0, 1\]"):
        NearDupFilter(0.0, 2)


def test_ivf_phase_agrees_with_brute_force():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(60, 32)).astype(np.float32)
    rows = centres[rng.integers(0, 60, 4000)] + 0.5 * rng.normal(size=(4000, 32)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    exact, _ = near_dup_mask(rows, 0.9, exact_until=10**9)
    approx, stats = near_dup_mask(rows, 0.9, exact_until=500, batch=300)
    assert "ivf-flat" in stats.method
    assert 0 < (~exact).sum() < len(rows)
    assert (approx == exact).mean() >= 0.995
    # deterministic: a second run (a resumed build) decides the same
    assert (near_dup_mask(rows, 0.9, exact_until=500, batch=300)[0] == approx).all()


@pytest.mark.slow
def test_build_with_near_dup_drops_planted_rows(tmp_path, tiny_clip_dir, text_model):
    import json

    from img2prompt.api import open_index
    from img2prompt.build_index.runner import BuildOptions, run_build
    from img2prompt.encoders.text import minilm_embeddings
    from tests.conftest import read_data_prompts

    prompts = read_data_prompts(40)
    planted = [prompts[i] + ", hd" for i in (3, 10, 20)]
    lines = prompts[:25] + planted + prompts[25:]
    corpus = tmp_path / "prompts.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    reference, _ = near_dup_mask(minilm_embeddings(text_model, lines), 0.96)
    assert not reference[25:28].any()  # the planted rows are near-duplicates at 0.96
    out = tmp_path / "idx"
    result = run_build(BuildOptions(corpus=[str(corpus)], out=str(out), clip_model=str(tiny_clip_dir),
                                    shard_size=16, batch_size=16, device="cpu", progress=False, near_dup=0.96))
    dropped = int((~reference).sum())
    assert result.report["skipped"]["near_duplicate"] == dropped
    assert result.report["kept"] == len(lines) - dropped
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["count"] == len(lines) - dropped
    assert manifest["near_dup"]["threshold"] == 0.96 and manifest["near_dup"]["dropped"] == dropped
    import pyarrow.parquet as pq
    table = pq.read_table(out / "prompts.parquet")
    kept = [p for p, k in zip(lines, reference) if k]
    assert table.column("id").to_pylist() == list(range(len(kept)))  # ids stay dense
    assert table.column("prompt").to_pylist() == kept
    with open_index(out, device="cpu") as index:
        [hit] = index.search(texts=[kept[30]], k=1)
        assert hit.prompts == [kept[30]] and int(hit.ids[0]) == 30
