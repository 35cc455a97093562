"""Hostile images: each decodable one is predicted, each undecodable one is named with its reason."""
from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from img2prompt.encoders.images import ImageDecodeError, list_images, load_image


def png_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def hostile_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hostile")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    full = png_bytes(rgb)
    (folder / "truncated.png").write_bytes(full[: len(full) // 2])
    (folder / "zero.png").write_bytes(b"")
    (folder / "text.jpg").write_bytes(b"this is not an image at all\n" * 10)
    rgb.convert("CMYK").save(folder / "cmyk.jpg")
    palette = rgb.convert("P")
    palette.info["transparency"] = 0
    palette.save(folder / "palette.png", transparency=0)
    rgb.convert("RGBA").save(folder / "rgba.png")
    rgb.convert("LA").save(folder / "la.png")
    Image.fromarray((np.arange(40 * 50).reshape(40, 50) * 30).astype(np.uint16)).save(folder / "sixteen.png")
    Image.new("RGB", (1, 1), (255, 0, 0)).save(folder / "tiny.png")
    Image.new("L", (6_000, 6_000), 128).save(folder / "huge.png", optimize=False)  # 137 MiB decoded: allowed
    # 20 KB on disk, under the pixel limit, but 13000×13000 would decode to 645 MiB (RGBA on the way): refused
    Image.new("1", (13_000, 13_000)).save(folder / "amplified.png", optimize=True)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    Image.new("RGB", (60, 20), (0, 128, 255)).save(folder / "rotated.jpg", exif=exif.tobytes())
    rgb.save(folder / "UPPER.PNG")
    rgb.save(folder / "dup.png")
    rgb.save(folder / "dup.jpg")
    # A decompression bomb: a tiny file whose header claims 20000 × 20000 pixels.
    Image.new("1", (20_000, 20_000)).save(folder / "bomb.png", optimize=True)
    return folder


def test_modes_are_converted_sensibly(hostile_folder):
    assert load_image(hostile_folder / "cmyk.jpg").mode == "RGB"
    assert load_image(hostile_folder / "la.png").mode == "RGB"
    rgba = Image.new("RGBA", (2, 2), (0, 0, 0, 0))
    rgba.save(hostile_folder / "clear.png")
    assert load_image(hostile_folder / "clear.png").getpixel((0, 0)) == (255, 255, 255)  # transparent → white
    sixteen = np.asarray(load_image(hostile_folder / "sixteen.png"))
    assert sixteen.max() > 100 and sixteen.min() < 10  # scaled, not clipped to white
    assert load_image(hostile_folder / "rotated.jpg").size == (20, 60)  # EXIF orientation applied
    assert load_image(hostile_folder / "huge.png").size == (6_000, 6_000)


@pytest.mark.parametrize("name, reason", [
    ("truncated.png", "corrupt image"), ("zero.png", "empty file (0 bytes)"),
    ("text.jpg", "not an image Pillow can read"), ("bomb.png", "too large"),
    ("amplified.png", "too large to decode (13000×13000 pixels would take 645 MiB, limit 256 MiB)")])
def test_undecodable_images_have_reasons(hostile_folder, name, reason):
    with pytest.raises(ImageDecodeError, match=re.escape(reason)):
        load_image(hostile_folder / name)


def test_listing_upper_case_and_duplicate_stems(hostile_folder):
    listing = list_images(hostile_folder)
    assert "UPPER" in listing.paths
    assert listing.paths["dup"].name == "dup.jpg"  # first by name
    assert [p.name for p in listing.duplicates["dup"]] == ["dup.png"]


def test_submit_over_hostile_folder_is_complete(built_index, hostile_folder, tmp_path):
    out = tmp_path / "submission.csv"
    import img2prompt

    with img2prompt.open_index(built_index, device="cpu") as index:
        report = index.submission(hostile_folder, out, progress=False, k=3)
    assert set(report.failed) == {"truncated", "zero", "text", "bomb", "amplified"}
    assert report.failed["zero"] == "empty file (0 bytes)"
    assert report.failed["amplified"].startswith("too large to decode")  # the bound holds on the CLI/API path
    assert report.predicted == report.images - 5
    assert [p.split("/")[-1] for p in report.duplicate_files] == ["dup.png"]
    frame = pd.read_csv(out)
    assert len(frame) == report.images * 384
    assert np.isfinite(frame["val"]).all()


def test_search_reports_a_bad_image_and_answers_the_rest(built_index, hostile_folder):
    import img2prompt
    from img2prompt.query.lookup import format_table, run_search

    with img2prompt.open_index(built_index, device="cpu") as index:
        results = run_search(index, [str(hostile_folder / "zero.png"), str(hostile_folder / "tiny.png")], k=2)
    entries = [result.to_dict() for result in results]
    assert entries[0]["error"] == "empty file (0 bytes)" and entries[0]["results"] == []
    assert [r["rank"] for r in entries[1]["results"]] == [1, 2] and "error" not in entries[1]
    assert "  error: empty file (0 bytes)" in format_table(results)


def test_extreme_aspect_ratio_is_refused_before_preprocessing(tmp_path, clip):
    """A 197-byte 1×60000 PNG passes the pixel limit but would cost minutes and GBs in the 224-px resize."""
    from img2prompt.encoders.clip_ensemble import ClipEnsemble
    from img2prompt.encoders.image_embed import embed_images
    from img2prompt.encoders.images import ImageDecodeError, load_image

    Image.new("L", (1, 60_000)).save(tmp_path / "strip.png", optimize=True)
    Image.new("RGB", (400, 20)).save(tmp_path / "banner.png")  # exactly 20:1 is still an image
    with pytest.raises(ImageDecodeError, match=r"unusable shape 1×60000"):
        load_image(tmp_path / "strip.png")
    assert load_image(tmp_path / "banner.png").size == (400, 20)
    embedded = embed_images(ClipEnsemble([clip]), [tmp_path / "strip.png", tmp_path / "banner.png"], workers=0)
    assert embedded.ok == [1] and "unusable shape" in embedded.failed[0]


def test_entries_that_are_not_image_files_are_counted(tmp_path):
    import os

    rgb = Image.new("RGB", (8, 8))
    rgb.save(tmp_path / "good.png")
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "dangling.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "pipe.png")
    raw_name = os.fsencode(tmp_path) + b"/bad\xff.png"
    with open(raw_name, "wb") as handle:
        rgb.save(handle, format="PNG")
    listing = list_images(tmp_path)
    assert list(listing.paths) == ["good"]
    assert listing.ignored == {"bad\\xff.png": "file name is not valid UTF-8 (an imgId must be text)",
                               "dangling.png": "dangling symbolic link", "folder.png": "a folder, not a file",
                               "pipe.png": "not a regular file (FIFO, socket or device)"}


def test_decoded_bytes_are_bounded_from_the_header(hostile_folder, monkeypatch):
    """The amplification PNG is refused from its header: Pillow never decodes its pixels."""
    from PIL import ImageFile

    from img2prompt.encoders.images import check_image

    assert (hostile_folder / "amplified.png").stat().st_size < 100_000
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda self: pytest.fail("pixels were decoded"))
    with pytest.raises(ImageDecodeError, match="too large to decode"):
        load_image(hostile_folder / "amplified.png")
    with pytest.raises(ImageDecodeError, match="too large to decode"):
        check_image((hostile_folder / "amplified.png").read_bytes())
    assert check_image((hostile_folder / "huge.png").read_bytes()) == (6_000, 6_000)
    with pytest.raises(ImageDecodeError, match="limit 1 MiB"):  # the server passes its own, lower bound
        check_image((hostile_folder / "huge.png").read_bytes(), max_decoded=2**20)


def _saved(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, **options)
    return buffer.getvalue()


@pytest.mark.parametrize("pillow_format, named", [
    ("TIFF", "TIFF"), ("BMP", "BMP"), ("GIF", "GIF"), ("ICO", "ICO"), ("PPM", "PPM"), ("TGA", None),
    ("SGI", "SGI"), ("QOI", "QOI"), ("DDS", "DDS")])
def test_only_png_jpeg_webp_are_decoded(tmp_path, pillow_format, named):
    """Pillow reads all of these; none is accepted, as a path or as bytes, and the error names the format."""
    from img2prompt.encoders.images import check_image

    image = Image.new("RGB", (16, 16), (200, 30, 30))
    try:
        data = _saved(image, format=pillow_format)
    except (KeyError, OSError) as exc:  # a Pillow without that writer
        pytest.skip(f"this Pillow cannot write {pillow_format}: {exc}")
    assert Image.open(io.BytesIO(data)).format  # Pillow itself would decode it
    path = tmp_path / f"image.{pillow_format.lower()}"
    path.write_bytes(data)
    expected = f"{named} images are not accepted (only PNG, JPEG and WebP)" if named else \
        "not an image Pillow can read (PNG, JPEG or WebP)"
    for source in (data, path):
        with pytest.raises(ImageDecodeError, match=re.escape(expected)):
            load_image(source)
        with pytest.raises(ImageDecodeError, match=re.escape(expected)):
            check_image(source)


def test_eps_never_reaches_ghostscript(monkeypatch):
    """An EPS upload is refused from its first bytes: the EPS plugin (which runs Ghostscript) is not called."""
    from PIL import EpsImagePlugin

    monkeypatch.setattr(EpsImagePlugin.EpsImageFile, "_open", lambda self: pytest.fail("the EPS plugin ran"))
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n"
    with pytest.raises(ImageDecodeError, match="EPS images are not accepted"):
        load_image(eps)


@pytest.mark.parametrize("pillow_format", ["PNG", "JPEG", "WEBP"])
def test_accepted_formats_decode(pillow_format):
    data = _saved(Image.new("RGB", (16, 16), (200, 30, 30)), format=pillow_format)
    assert load_image(data).size == (16, 16)
