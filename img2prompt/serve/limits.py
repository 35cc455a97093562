"""What one request (and one client) may cost the server: every bound `img2prompt serve` enforces, in one
validated place (and where it listens by default). A plain dataclass: the CLI builds its parser from it without
importing FastAPI. The defaults fit the page and the Kaggle use (a few 512×512 images, k ≤ 100)."""
from __future__ import annotations

import dataclasses

from img2prompt.encoders.images import MAX_DECODED_BYTES


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    max_upload: int = 20 * 2**20  # bytes of a multipart body (images + form), refused (413) as soon as passed
    max_json: int = 2**20  # bytes of a JSON body: texts are short; 1 MiB is ~ 3000 long prompts
    max_batch: int = 32  # queries (images or texts) per request; more: 413
    max_k: int = 1000  # results per query (also ≤ the index size)
    max_fields: int = 64  # parts of a multipart form (files + fields); more: 413
    max_text_chars: int = 4096  # characters of one query text kept (CLIP reads 77 tokens; the rest is cut)
    max_decoded_image: int = MAX_DECODED_BYTES  # bytes one image may decode to (its header tells before decoding)
    max_decoded_request: int = 1 * 2**30  # the same, summed over a request's images
    request_timeout: float = 60.0  # seconds a request may wait for and use the model; then 503
    body_timeout: float = 30.0  # seconds to receive a whole body once its headers arrived; then 408
    header_timeout: float = 10.0  # seconds from connecting (or the last response) to a request's full headers
    max_connections: int = 512  # open connections in all
    max_connections_per_client: int = 16  # open connections per client address
    queue_size: int = 64  # requests (fully arrived) waiting for the model; more: 503
    # Requests waiting together share one encoder call (then each is searched and blended on its own rows):
    merge_items: int = 64  # images or texts in one merged encoder call; 1 = every request encodes alone
    merge_wait: float = 0.002  # seconds a call waits for more requests to join it; 0 = only those already queued

    def check(self) -> "ServeLimits":
        """Self, or ValueError naming the first field that is not positive (merge_wait: negative)."""
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (value >= 0 if field.name == "merge_wait" else value > 0):
                raise ValueError(f"{field.name} must be {'0 or more' if field.name == 'merge_wait' else 'positive'} "
                                 f"(got {value!r})")
        if self.max_connections_per_client > self.max_connections:
            raise ValueError("max_connections_per_client must not be over max_connections")
        return self


DEFAULT_LIMITS = ServeLimits()
# Where `img2prompt serve` listens unless told: this machine only, the usual development port.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
