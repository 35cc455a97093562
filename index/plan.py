"""Choosing the index kind: an explicit table over (count, dim, memory budget).

autofaiss was considered and not used: it pulls a large dependency tree for one decision, optimises recall
on in-index queries (which flatters approximate indexes against our cross-modal image queries) and returns
nothing on an impossible budget; this table is a few lines, refuses impossible budgets loudly, and every
approximate kind re-ranks its candidates exactly.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

from img2prompt.errors import UserError
from img2prompt.index.backend import backend_class

INDEX_KINDS = ("auto", "flat", "hnsw", "ivfpq")
AUTO_ORDER = ("flat", "hnsw", "ivfpq")  # most exact first
FLAT_AUTO_LIMIT = 2_000_000  # exact search stays affordable (GPU, or batched CPU) up to about here


@dataclass
class IndexPlan:
    kind: str
    params: dict = field(default_factory=dict)
    estimated_bytes: int = 0
    reason: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def plan_index(count: int, dim: int, kind: str = "auto", max_memory: int | None = None) -> IndexPlan:
    """Pick the index from an explicit table; an impossible budget is an error, never an empty answer."""
    if kind not in INDEX_KINDS:
        raise UserError(f"unknown --index {kind!r}: choose from {', '.join(INDEX_KINDS)}")
    table: dict[str, tuple[dict, int]] = {}
    for name in AUTO_ORDER:
        backend = backend_class(name)
        if count >= backend.min_count:
            params = backend.default_params(count, dim, max_memory)
            table[name] = (params, backend.estimate_bytes(count, dim, params))
    if kind != "auto":
        if kind not in table:
            raise UserError(f"--index {kind} needs at least {backend_class(kind).min_count:,} prompts to train; "
                            f"this corpus has {count:,}")
        params, size = table[kind]
        if max_memory is not None and size > max_memory:
            raise UserError(f"--index {kind} needs about {size / 2**30:.2f} GiB for {count:,}×{dim} "
                            f"vectors, over --max-memory {max_memory / 2**30:.2f} GiB")
        return IndexPlan(kind, params, size, "asked for")
    for name, (params, size) in table.items():
        if name == "flat" and count > FLAT_AUTO_LIMIT:
            continue
        if max_memory is None or size <= max_memory:
            reason = "exact search fits" if name == "flat" else "smallest exact-enough index within the budget"
            return IndexPlan(name, params, size, reason)
    sizes = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, (_, size) in table.items())
    raise UserError(f"no index type fits --max-memory {max_memory / 2**30:.2f} GiB for {count:,}×{dim} vectors "
                    f"(needs: {sizes}); raise --max-memory")
