"""Score calibration between key kinds, fitted at build time on the index's own image-keyed entries.

A query image's cosine to another image (image→image) runs much higher than to a prompt (image→text), so
raw scores would hand the whole top-k to the image keys. Each kind is searched on its own, and an
image-key score s is mapped onto the text keys' scale before the lists merge:

    s' = scale · s + offset,  chosen so that equal scores predict equal neighbour quality.

Quality is what the metric rewards: the cosine between the neighbour's MiniLM vector and the query's true
prompt. Sample image-keyed rows serve as queries whose true prompt is known (as images, and as the CLIP
text of their prompt for text queries); their top-k per kind, leaving out the query's own prompt (and any
identical one, so that the fit describes unseen prompts), gives (score, quality) points; a least-squares
line quality ≈ a + b·s is fitted per kind, and s' = (a_image + b_image·s − a_text) / b_text. Where a line
is not usable (a slope ≤ 0: untrained weights, too few points) the top-k scores' mean and spread are matched
instead (method "moments"). The text keys are the reference, so an index without image keys is unchanged.
"""
from __future__ import annotations

import numpy as np

from img2prompt.index.flat import exact_search

CALIBRATION_QUERIES = 256  # sample image-keyed rows used as queries
MIN_POINTS = 2  # (score, quality) points a kind needs for any map
MIN_CORRELATION = 0.2  # a line whose score explains less of the quality than this is noise, not a slope
CALIBRATION_K = 20  # neighbours per query and key kind
SAME_PROMPT = 0.999  # MiniLM cosine above which a neighbour is the query's own prompt (left out)
EXTRA = 32  # candidates fetched beyond k, to make up for the ones left out


def line_fit(scores: np.ndarray, quality: np.ndarray) -> tuple[float, float] | None:
    """(a, b) of the least-squares line quality ≈ a + b · score; None when the scores do not vary or the
    line explains too little (correlation under MIN_CORRELATION: its slope would be noise)."""
    scores, quality = np.asarray(scores, np.float64), np.asarray(quality, np.float64)
    if len(scores) < MIN_POINTS:
        return None
    spread, quality_spread = scores - scores.mean(), quality - quality.mean()
    denominator = float(spread @ spread)
    if denominator <= 1e-12 or float(quality_spread @ quality_spread) <= 1e-12:
        return None
    b = float(spread @ quality_spread) / denominator
    correlation = float(spread @ quality_spread) / np.sqrt(denominator * float(quality_spread @ quality_spread))
    if correlation < MIN_CORRELATION:
        return None
    return float(quality.mean() - b * scores.mean()), b


def fit_map(text: tuple[np.ndarray, np.ndarray], image: tuple[np.ndarray, np.ndarray]) -> dict:
    """{"scale", "offset", "method", ...} mapping image-key scores onto the text keys' scale, from
    (scores, quality) points of each kind. Too few points of a kind: no map (method "none", identity)."""
    if len(text[0]) < MIN_POINTS or len(image[0]) < MIN_POINTS:
        return {"scale": 1.0, "offset": 0.0, "method": "none"}
    text_line, image_line = line_fit(*text), line_fit(*image)
    if text_line and image_line:  # both slopes > 0: line_fit refuses a weak or negative correlation
        (a_text, b_text), (a_image, b_image) = text_line, image_line
        return {"scale": b_image / b_text, "offset": (a_image - a_text) / b_text, "method": "quality",
                "text_line": [a_text, b_text], "image_line": [a_image, b_image]}
    text_scores, image_scores = np.asarray(text[0], np.float64), np.asarray(image[0], np.float64)
    scale = float(text_scores.std() / image_scores.std()) if image_scores.std() > 1e-12 else 1.0
    return {"scale": scale, "offset": float(text_scores.mean() - scale * image_scores.mean()), "method": "moments"}


def neighbour_points(keys: np.ndarray, minilm: np.ndarray, start: int, queries: np.ndarray,
                     truth: np.ndarray, k: int = CALIBRATION_K) -> tuple[np.ndarray, np.ndarray]:
    """(scores, quality) of each query's top-k among `keys` (rows start.. of the index), its own prompt
    left out."""
    scores, ids = exact_search(keys, queries, k + EXTRA)
    all_scores, all_quality = [], []
    for row in range(len(queries)):
        valid = ids[row] >= 0
        row_ids, row_scores = ids[row][valid], scores[row][valid]
        vectors = np.asarray(minilm[row_ids + start], np.float64)
        quality = vectors @ truth[row] / np.maximum(np.linalg.norm(vectors, axis=1), 1e-12)
        keep = quality < SAME_PROMPT
        all_scores.append(row_scores[keep][:k])
        all_quality.append(quality[keep][:k])
    return np.concatenate(all_scores), np.concatenate(all_quality)


def fit_calibration(clip_vectors: np.ndarray, minilm: np.ndarray, text_rows: tuple[int, int],
                    image_rows: tuple[int, int], prompts_of, encode_texts, seed: int = 0, weigh=None) -> dict:
    """The manifest's "calibration": a map per query kind (image, text) for the image keys.

    `prompts_of(ids)` gives the prompts of index rows, `encode_texts(prompts)` their CLIP text vectors;
    `weigh(queries)` turns query vectors into the ones searched (an index of several CLIP models searched
    with --model-weights: the map is fitted again for those weights, see query/search.py)."""
    rng = np.random.default_rng(seed)
    count = min(CALIBRATION_QUERIES, image_rows[1] - image_rows[0])
    sample = np.sort(rng.choice(np.arange(*image_rows), size=count, replace=False))
    truth = np.asarray(minilm[sample], np.float64)
    truth /= np.maximum(np.linalg.norm(truth, axis=1, keepdims=True), 1e-12)
    queries = {"image": np.asarray(clip_vectors[sample], np.float32),
               "text": np.asarray(encode_texts(prompts_of(sample)), np.float32)}
    if weigh is not None:
        queries = {kind: np.asarray(weigh(vectors), np.float32) for kind, vectors in queries.items()}
    maps, fits = {}, {}
    for query_kind, vectors in queries.items():
        points = {kind: neighbour_points(clip_vectors[start:stop], minilm, start, vectors, truth)
                  for kind, (start, stop) in (("text", text_rows), ("image", image_rows))}
        fit = fit_map(points["text"], points["image"])
        maps[query_kind] = {"image": {"scale": fit["scale"], "offset": fit["offset"]}}
        fits[query_kind] = {**fit, "points": {kind: len(scores) for kind, (scores, _) in points.items()},
                            "mean_raw_score": {kind: float(scores.mean()) if len(scores) else None
                                               for kind, (scores, _) in points.items()}}
    return {"queries": int(count), "k": CALIBRATION_K, "seed": seed, "maps": maps, "fits": fits}
