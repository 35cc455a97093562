"""Near-duplicate removal (`build --near-dup T`): drop a prompt whose MiniLM cosine to an already KEPT prompt is
≥ T. Deterministic (corpus order, first kept wins) and streaming: exact brute force while few rows are kept,
then an IVF-Flat over the kept vectors (trained once on the first `exact_until` kept rows, added to as rows are
kept, generous nprobe). IVF-Flat stores the raw vectors, so every reported candidate's cosine is exact; the
approximation is only in which candidates are looked at. NaN or zero vectors are refused (one-line error):
normalised MiniLM vectors never are, so one means a damaged shard."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from img2prompt.errors import UserError

EXACT_UNTIL = 50_000  # kept rows searched by brute force before the IVF takes over
CHUNK = 1024  # rows per within-batch Gram matrix (bounds memory)


@dataclass
class NearDupStats:
    threshold: float
    seen: int = 0
    dropped: int = 0
    method: str = "exact"

    def manifest(self) -> dict:
        return {"threshold": self.threshold, "dropped": self.dropped, "seen": self.seen, "method": self.method}


class NearDupFilter:
    """Feed normalised float32 batches in corpus order; each feed returns the keep mask of that batch."""

    def __init__(self, threshold: float, dim: int, exact_until: int = EXACT_UNTIL, nprobe: int = 64):
        if not 0 < threshold <= 1:
            raise UserError(f"--near-dup must be in (0, 1], got {threshold}")
        self.threshold, self.dim, self.exact_until, self.nprobe = float(threshold), dim, exact_until, nprobe
        self.stats = NearDupStats(self.threshold)
        self._kept = np.zeros((0, dim), dtype=np.float32)  # brute-force phase only
        self._blocks: list[np.ndarray] = []
        self._index = None  # faiss IVF-Flat once trained

    def _kept_max(self, batch: np.ndarray) -> np.ndarray:
        """Best cosine of each row to any kept row (−inf when none)."""
        if self._index is not None:
            scores, _ = self._index.search(batch, 1)
            return np.where(np.isfinite(scores[:, 0]) & (scores[:, 0] > -1e30), scores[:, 0], -np.inf)
        if self._blocks:
            self._kept = np.concatenate([self._kept, *self._blocks])
            self._blocks = []
        if len(self._kept) == 0:
            return np.full(len(batch), -np.inf, dtype=np.float32)
        return (batch @ self._kept.T).max(axis=1)

    def _add(self, rows: np.ndarray) -> None:
        if self._index is not None:
            self._index.add(rows)
            return
        self._blocks.append(rows)
        if len(self._kept) + sum(len(b) for b in self._blocks) >= self.exact_until:
            self._train()

    def _train(self) -> None:
        import faiss
        kept = np.concatenate([self._kept, *self._blocks])
        nlist = max(1, min(int(4 * np.sqrt(len(kept))), len(kept) // 39))  # faiss wants ≥ 39 points a list
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(self.dim), self.dim, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.seed = 1234  # deterministic training: a resumed build makes the same decisions
        index.train(kept)
        index.add(kept)
        index.nprobe = min(nlist, self.nprobe)
        self._index, self._kept, self._blocks = index, np.zeros((0, self.dim), np.float32), []
        self.stats.method = f"exact then ivf-flat(nlist={nlist}, nprobe={index.nprobe}) after {len(kept)} kept"

    def feed(self, batch: np.ndarray) -> np.ndarray:
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        if batch.ndim != 2 or batch.shape[1] != self.dim:
            raise UserError(f"near-dup: expected vectors of dim {self.dim}, got shape {batch.shape}")
        norms = np.linalg.norm(batch, axis=1)
        bad = np.flatnonzero(~np.isfinite(norms) | (norms < 1e-6))
        if len(bad):
            raise UserError(f"near-dup: row {self.stats.seen + int(bad[0])} has a NaN or zero MiniLM vector")
        keep = np.ones(len(batch), dtype=bool)
        for start in range(0, len(batch), CHUNK):
            keep[start:start + CHUNK] = self._feed_chunk(batch[start:start + CHUNK])
        self.stats.seen += len(batch)
        self.stats.dropped += int((~keep).sum())
        return keep

    def _feed_chunk(self, chunk: np.ndarray) -> np.ndarray:
        keep = self._kept_max(chunk) < self.threshold
        gram = chunk @ chunk.T  # within the chunk: a row also falls to an earlier KEPT row of the same chunk
        for i in range(1, len(chunk)):
            if keep[i] and (gram[i, :i][keep[:i]] >= self.threshold).any():
                keep[i] = False
        self._add(chunk[keep])
        return keep


def near_dup_mask(vectors: np.ndarray, threshold: float, exact_until: int = EXACT_UNTIL,
                  batch: int = 8192) -> tuple[np.ndarray, NearDupStats]:
    """Keep mask of the whole array (streamed through a NearDupFilter in order)."""
    filt = NearDupFilter(threshold, vectors.shape[1], exact_until=exact_until)
    masks = [filt.feed(vectors[start:start + batch]) for start in range(0, len(vectors), batch)]
    mask = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    return mask, filt.stats


def shard_keep_masks(writer, threshold: float) -> tuple[dict[int, np.ndarray], NearDupStats]:
    """Stream the committed text-keyed MiniLM shards in corpus order through one filter: {shard: keep mask}.
    Recomputed from the committed shards on every run, so a resumed build makes the identical decisions."""
    from img2prompt.index.layout import TEXT_KEYS, shard_path

    masks: dict[int, np.ndarray] = {}
    filt = None
    for record in writer._ordered_records():
        if record.get("keys", TEXT_KEYS) != TEXT_KEYS:
            continue  # image-keyed entries (--pairs) are not prompts to deduplicate
        block = np.load(shard_path(writer.root, record["number"], "minilm"), mmap_mode="r")
        filt = filt or NearDupFilter(threshold, block.shape[1])
        try:
            masks[record["number"]] = filt.feed(np.asarray(block, dtype=np.float32))
        except UserError as exc:
            raise UserError(f"shard {record['number']}: {exc}") from None
    return masks, (filt.stats if filt else NearDupStats(float(threshold)))
