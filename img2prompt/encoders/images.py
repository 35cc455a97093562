"""Image files → decoded RGB images, safely: every failure becomes a named, counted reason, never a crash.

imgId = file stem. Handles upper-case extensions, EXIF rotation, CMYK / palette / alpha / 16-bit modes,
and refuses decompression bombs before decoding them (Pillow checks the header size first).
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from img2prompt import storage
from img2prompt.errors import UserError, short_reason

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")
MAX_PIXELS = 2 * 89_478_485  # Pillow's own bomb limit (2 × MAX_IMAGE_PIXELS): ~179 MP, e.g. 13k × 13k
# A 1×60000 PNG is 197 bytes and under the pixel limit, but resizing its short side to 224 makes a
# 224×13M image (229 s, 13 GB measured). Generated images are near-square: refuse extreme shapes.
MAX_ASPECT = 20
MAX_SIDE = 32_768
# A 20 KB 1-bit PNG of 13000×13000 passes the pixel limit yet decodes to 507 MB of RGB: bound what decoding
# makes. 4 bytes a pixel is the widest mode a usable image passes through (RGBA before compositing on white);
# the bound admits 8192×8192 RGB (Stable Diffusion makes ≤ 2048×2048).
DECODED_BYTES_PER_PIXEL = 4
MAX_DECODED_BYTES = 256 * 2**20
# Only these are decoded: every other Pillow plugin (TIFF, BMP, ICO, PPM, TGA, SGI, DDS, QOI, EPS, which runs
# Ghostscript, ...) is never even asked to read a header.
FORMATS = ("PNG", "JPEG", "WEBP")
# Magic bytes of formats refused above, so that the error can name what the file is.
_MAGIC = ((b"\x89PNG", "PNG"), (b"\xff\xd8\xff", "JPEG"), (b"GIF8", "GIF"), (b"II*\x00", "TIFF"),
          (b"MM\x00*", "TIFF"), (b"BM", "BMP"), (b"\x00\x00\x01\x00", "ICO"), (b"qoif", "QOI"),
          (b"DDS ", "DDS"), (b"%!PS", "EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"8BPS", "PSD"),
          (b"\x01\xda", "SGI"), (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xffO\xffQ", "JPEG 2000"),
          (b"%PDF", "PDF"), (b"icns", "ICNS"))


class ImageDecodeError(Exception):
    """An image that cannot be used; the message is the reason shown in reports."""


@dataclass
class ImageListing:
    paths: dict[str, Path]  # imgId → file, in sorted id order
    duplicates: dict[str, list[Path]] = field(default_factory=dict)  # imgId → files not used
    ignored: dict[str, str] = field(default_factory=dict)  # entry with an image suffix → why it was not used


def _not_usable(path: Path) -> str | None:
    """Why an entry with an image suffix cannot be an image file, or None when it can."""
    try:
        path.name.encode("utf-8")
    except UnicodeEncodeError:
        return "file name is not valid UTF-8 (an imgId must be text)"
    if path.is_symlink() and not path.exists():
        return "dangling symbolic link"
    if path.is_dir():
        return "a folder, not a file"
    if not path.is_file():
        return "not a regular file (FIFO, socket or device)"
    return None


def list_images(folder: str | Path) -> ImageListing:
    """All images under `folder` (not recursive), keyed by stem; a stem seen twice keeps the first by name.
    Entries with an image suffix that cannot be used are listed in `ignored` with the reason."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"images folder not found: {folder}")
    listing = ImageListing(paths={})
    for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES):
        reason = _not_usable(path)
        if reason:
            listing.ignored[os.fsencode(path.name).decode("utf-8", "backslashreplace")] = reason
        elif path.stem in listing.paths:
            listing.duplicates.setdefault(path.stem, []).append(path)
        else:
            listing.paths[path.stem] = path
    listing.paths = dict(sorted(listing.paths.items()))
    return listing


def to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode → 8-bit RGB (16-bit scaled, transparency composited on white)."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits (a plain convert clips everything above 255 to white).
        array = np.asarray(image, dtype=np.float64)
        peak = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), mode="L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "La", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)  # transparent areas become white, not black
    return image.convert("RGB")


def _sniff_format(head: bytes) -> str | None:
    """The format these first bytes start, among those `_MAGIC` knows (None: unknown)."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if len(head) >= 3 and head[:1] == b"P" and head[1:2] in b"1234567" and head[2:3] in b" \t\r\n":
        return "PPM"
    return next((name for magic, name in _MAGIC if head.startswith(magic)), None)


def decoded_bytes(width: int, height: int) -> int:
    """Bytes that decoding an image of this size may hold at once (see MAX_DECODED_BYTES)."""
    return width * height * DECODED_BYTES_PER_PIXEL


def _check_header(image: Image.Image, max_decoded: int) -> None:
    width, height = image.size
    if width * height > MAX_PIXELS:
        raise ImageDecodeError(f"too large ({width}×{height} pixels, limit {MAX_PIXELS:,})")
    if max(width, height) > MAX_SIDE or max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageDecodeError(f"unusable shape {width}×{height} (a side over {MAX_SIDE:,} px or an "
                               f"aspect ratio over {MAX_ASPECT}:1)")
    needed = decoded_bytes(width, height)
    if needed > max_decoded:
        raise ImageDecodeError(f"too large to decode ({width}×{height} pixels would take {needed / 2**20:,.0f} MiB, "
                               f"limit {max_decoded / 2**20:,.0f} MiB)")


def _open(opened) -> Image.Image:
    """Image.open restricted to FORMATS; anything else is refused from its first bytes, before any plugin runs."""
    try:
        return Image.open(opened, formats=FORMATS)
    except Image.UnidentifiedImageError:
        if isinstance(opened, io.BytesIO):
            head = opened.getvalue()[:16]
        else:
            with open(opened, "rb") as file:
                head = file.read(16)
        found = _sniff_format(head)
        if found and found not in FORMATS:
            raise ImageDecodeError(f"{found} images are not accepted (only PNG, JPEG and WebP)") from None
        raise


@contextlib.contextmanager
def _header_checked(source: str | Path | bytes, max_decoded: int):
    """The opened image (a path, a URL, or an upload's bytes) whose header passed every check, pixels not yet
    decoded; any failure as an ImageDecodeError with the reason."""
    if storage.is_url(source):
        source = _read_url(source, max_decoded)
    in_memory = isinstance(source, (bytes, bytearray))
    opened = io.BytesIO(source) if in_memory else Path(source)
    try:
        if (len(source) if in_memory else opened.stat().st_size) == 0:
            raise ImageDecodeError("empty file (0 bytes)")
        with warnings.catch_warnings():
            # Pillow's own warnings (decompression-bomb size, odd EXIF data) are handled here, not printed raw.
            warnings.simplefilter("ignore")
            with _open(opened) as image:
                _check_header(image, max_decoded)
                yield image
    except ImageDecodeError:
        raise
    except _PILLOW_ERRORS as exc:
        raise _decode_error(exc) from exc


def _read_url(url: str, max_decoded: int) -> bytes:
    """A remote image's bytes (through the storage seam); a missing or unreachable object is a named reason.
    A file larger than what its pixels may decode to is refused unread: no usable image compresses to more."""
    try:
        return storage.read_bytes(url, max_decoded)
    except UserError:
        raise  # no fsspec backend for the scheme: the user's setup, not this image
    except FileNotFoundError:
        raise ImageDecodeError("file not found") from None
    except ValueError as exc:
        raise ImageDecodeError(f"too large to read ({exc})") from None
    except Exception as exc:  # whatever the backend raises for a dropped connection, a refused request, ...
        raise ImageDecodeError(f"cannot read ({type(exc).__name__}: {short_reason(exc, 120)})") from None


def check_image(source: str | Path | bytes, max_decoded: int = MAX_DECODED_BYTES) -> tuple[int, int]:
    """(width, height) of an image that `load_image` would accept as far as its header tells, without
    decoding its pixels; raises ImageDecodeError with the reason (the server checks uploads with this)."""
    with _header_checked(source, max_decoded) as image:
        return image.size


def load_image(source: str | Path | bytes, max_decoded: int = MAX_DECODED_BYTES) -> Image.Image:
    """Decode one image (a file path, or the bytes of an upload) as RGB, EXIF orientation applied;
    raises ImageDecodeError with the reason."""
    with _header_checked(source, max_decoded) as image:  # a decoding error below comes out as ImageDecodeError
        image.load()
        image = ImageOps.exif_transpose(image) or image
        return to_rgb(image)


_PILLOW_ERRORS = (Image.DecompressionBombError, OSError, SyntaxError, ValueError)  # Unidentified… is an OSError


def _decode_error(exc: Exception) -> ImageDecodeError:
    """Pillow's and the file system's exceptions → ImageDecodeError with a short reason."""
    if isinstance(exc, Image.DecompressionBombError):
        return ImageDecodeError(f"too large ({exc})")
    if isinstance(exc, FileNotFoundError):  # e.g. a pairs table naming an image that is not there
        return ImageDecodeError("file not found")
    if isinstance(exc, Image.UnidentifiedImageError):
        return ImageDecodeError("not an image Pillow can read (PNG, JPEG or WebP)")
    return ImageDecodeError(f"corrupt image ({short_reason(exc, 120)})")  # truncated / corrupt data
