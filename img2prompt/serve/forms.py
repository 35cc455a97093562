"""Request bodies: read within a byte and time budget, multipart forms parsed in memory, uploads' headers
checked before any pixel is decoded, and the JSON text query of POST /search."""
from __future__ import annotations

import asyncio

from fastapi import HTTPException, Request
from pydantic import BaseModel, Field
from python_multipart.multipart import MultipartParser, parse_options_header

from img2prompt.api import DEFAULT_SEARCH_K
from img2prompt.errors import short_reason
from img2prompt.serve.limits import DEFAULT_LIMITS, ServeLimits


class TextQuery(BaseModel):
    """JSON body of POST /search for a text query."""
    text: str | list[str] = Field(description="one query text, or several (at most the server's max batch)",
                                  examples=["a castle on a hill, matte painting"])
    k: int = Field(DEFAULT_SEARCH_K, description="results per query (1 … min(index size, the server's max k))")
    model_weights: str | None = Field(None, description="an index of several CLIP models: W1,W2,... (default equal)")
    min_score: float | None = Field(None, description="leave out hits scoring under it (the best one stays)")


async def read_body(request: Request, limit: int, timeout: float = DEFAULT_LIMITS.body_timeout) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes (before it is all read), and
    with 408 when it has not all arrived within `timeout` seconds (a slow upload holds no slot for long)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"request body of {int(declared):,} bytes is over the limit of {limit:,} bytes")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise HTTPException(413, f"request body is over the limit of {limit:,} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise HTTPException(408, f"the request body did not arrive within {timeout:g} s") from None
    return b"".join(chunks)


def parse_form(body: bytes, content_type: str, max_fields: int = DEFAULT_LIMITS.max_fields
               ) -> tuple[list[tuple[str, bytes]], dict[str, str]]:
    """multipart/form-data in memory → ([(file name, bytes)] in order, {field: value}); at most `max_fields`
    parts (413). CPU work on a whole body: the server runs it in a thread, never on the event loop."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise HTTPException(400, "multipart body without a boundary")
    parts: list[dict] = []
    header: dict[str, bytes] = {}

    def on_part_begin() -> None:
        if len(parts) >= max_fields:
            raise HTTPException(413, f"the form has over {max_fields} parts (files and fields), this server's limit")
        parts.append({"headers": {}, "data": []})

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] = header.get("field", b"") + data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] = header.get("value", b"") + data[start:end]

    def on_header_end() -> None:
        parts[-1]["headers"][header.pop("field", b"").lower()] = header.pop("value", b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        parts[-1]["data"].append(data[start:end])

    try:  # the constructor too: it refuses a boundary over 256 characters (FormParserError)
        parser = MultipartParser(boundary, {"on_part_begin": on_part_begin, "on_header_field": on_header_field,
                                            "on_header_value": on_header_value, "on_header_end": on_header_end,
                                            "on_part_data": on_part_data})
        parser.write(body)
        parser.finalize()
    except HTTPException:
        raise
    except Exception as exc:  # python-multipart's parse errors
        raise HTTPException(400, f"malformed multipart body ({short_reason(exc, 120)})") from None
    files, fields = [], {}
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        data = b"".join(part["data"])
        if b"filename" in disposition:
            if name != "image":  # a misnamed field is the client's mistake, not an image to guess at
                raise HTTPException(422, f"a file in the form field {name[:60]!r}: send images in a field named image")
            files.append((disposition[b"filename"].decode("utf-8", "replace") or name or "upload", data))
        elif name in fields:  # the document says one value (k, min_score, …): a second one is not guessed at
            raise HTTPException(422, f"the form field {name[:60]!r} is given twice: send it once")
        else:
            fields[name] = data.decode("utf-8", "replace")
    return files, fields


def check_uploads(files: list[tuple[str, bytes]], limits: ServeLimits) -> None:
    """Each upload's header (format, size, decoded bytes) checked without decoding pixels, and the decoded
    bytes summed over the request; 400 / 413 naming the file."""
    from img2prompt.encoders.images import ImageDecodeError, check_image, decoded_bytes

    total = 0
    for name, data in files:
        try:
            width, height = check_image(data, limits.max_decoded_image)
        except ImageDecodeError as exc:
            raise HTTPException(400, f"{name}: {exc}") from None
        total += decoded_bytes(width, height)
        if total > limits.max_decoded_request:
            raise HTTPException(413, f"{name}: the request's images would decode to over "
                                     f"{limits.max_decoded_request / 2**20:,.0f} MiB, this server's limit")
