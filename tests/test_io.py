"""Pixel contract and failure modes of bonefrac.io (read_image, decode_image, resize_gray)."""

import io
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from bonefrac.errors import ImageReadError
from bonefrac.io import IMAGE_EXTENSIONS, MAX_PIXELS, decode_image, decode_image_and_colour, read_image, resize_gray
from conftest import pattern, save

pydicom = pytest.importorskip("pydicom")


# --- helpers ------------------------------------------------------------------------------------------------


def write_dicom(path, pixels, photometric="MONOCHROME2", preamble=True, **tags):
    """A minimal uncompressed single-frame DICOM file (works with pydicom 2.x and 3.x)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = bits, bits, bits - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in tags.items():
        setattr(ds, key, value)
    if hasattr(ds, "set_original_encoding"):
        ds.set_original_encoding(False, True)
    else:  # pydicom 2.x
        ds.is_little_endian, ds.is_implicit_VR = True, False
    try:
        ds.save_as(path, enforce_file_format=preamble)
    except TypeError:  # pydicom 2.x
        ds.save_as(path, write_like_original=not preamble)
    return path


def png_bomb(path, side=20000):
    """A valid 1-bit PNG of side x side pixels that is only a few kB on disk."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer, row = zlib.compressobj(9), b"\0" * (1 + (side + 7) // 8)
    body = b"".join(packer.compress(row * 1000) for _ in range(side // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))
    return path


def encoded(img, fmt, **kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(img).save(buffer, fmt, **kwargs)
    return buffer.getvalue()


# --- pixel contract -----------------------------------------------------------------------------------------


def test_grayscale_png_is_exact(tmp_path):
    img = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = read_image(save(img, tmp_path / "g.png"))
    assert out.dtype == np.uint8 and out.shape == (16, 16)
    np.testing.assert_array_equal(out, img)


@pytest.mark.parametrize("fmt,suffix,kwargs", [("BMP", ".bmp", {}), ("WEBP", ".webp", {"lossless": True}),
                                                ("TIFF", ".tif", {}), ("PNG", ".png", {})])
def test_lossless_formats_roundtrip(tmp_path, fmt, suffix, kwargs):
    img = pattern(1)
    out = read_image(save(img, tmp_path / f"x{suffix}", format=fmt, **kwargs))
    np.testing.assert_array_equal(out, img)


def test_jpeg_reads_close(tmp_path):
    img = pattern(2)
    out = read_image(save(img, tmp_path / "x.jpg", quality=95))
    assert out.shape == img.shape and np.abs(out.astype(int) - img).mean() < 3


def test_rgb_uses_601_luma(tmp_path):
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[0, 0], rgb[0, 1], rgb[0, 2] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    rgb[1, :] = (10, 200, 90)
    out = read_image(save(rgb, tmp_path / "c.png")).astype(int)
    expected = [[76, 150, 29], [int(round(10 * .299 + 200 * .587 + 90 * .114))] * 3]
    assert np.abs(out - np.array(expected)).max() <= 1


def test_rgba_and_la_are_composited_on_black(tmp_path):
    rgba = np.zeros((1, 3, 4), np.uint8)
    rgba[0, 0], rgba[0, 1], rgba[0, 2] = (255, 255, 255, 255), (255, 255, 255, 128), (255, 255, 255, 0)
    out = read_image(save(rgba, tmp_path / "a.png")).astype(int)
    assert np.abs(out[0] - [255, 128, 0]).max() <= 1
    la = Image.fromarray(np.array([[[200, 255], [200, 0]]], np.uint8), mode="LA")
    la.save(tmp_path / "la.png")
    assert np.abs(read_image(tmp_path / "la.png").astype(int)[0] - [200, 0]).max() <= 1


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_16bit_is_percentile_scaled(tmp_path, suffix):
    ramp = np.linspace(1000, 5000, 200 * 50).reshape(200, 50).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / f"d{suffix}")
    out = read_image(tmp_path / f"d{suffix}")
    assert out.dtype == np.uint8 and out.shape == ramp.shape
    assert out.min() == 0 and out.max() == 255 and abs(int(out[100, 0]) - 128) <= 2
    assert (np.diff(out.ravel().astype(int)) >= 0).all()  # monotone: no wrap-around


def test_flat_16bit_image_does_not_crash(tmp_path):
    Image.fromarray(np.full((8, 8), 700, np.uint16)).save(tmp_path / "flat.png")
    assert read_image(tmp_path / "flat.png").shape == (8, 8)


# --- DICOM --------------------------------------------------------------------------------------------------


def _two_tone(dtype=np.uint8, dark=20, bright=200):
    pixels = np.full((8, 16), dark, dtype)
    pixels[:, 8:] = bright
    return pixels


def test_dicom_monochrome2_bone_bright(tmp_path):
    out = read_image(write_dicom(tmp_path / "m2.dcm", _two_tone()))
    assert out[0, 0] == 0 and out[0, -1] == 255


def test_dicom_monochrome1_is_inverted(tmp_path):
    m2 = read_image(write_dicom(tmp_path / "m2.dcm", _two_tone()))
    m1 = read_image(write_dicom(tmp_path / "m1.dcm", _two_tone(), photometric="MONOCHROME1"))
    np.testing.assert_array_equal(m1, 255 - m2)
    assert m1[0, 0] == 255  # low stored value is bright in MONOCHROME1


def test_dicom_16bit_rescale_and_window(tmp_path):
    # raw 250 / 375 / 500 -> slope 2, intercept -524 -> -24 / 226 / 476; window 226 +- 250
    pixels = np.array([[250, 375, 500]], np.uint16).repeat(4, axis=0)
    path = write_dicom(tmp_path / "w.dcm", pixels, RescaleSlope=2, RescaleIntercept=-524,
                       WindowCenter=226, WindowWidth=501)
    out = read_image(path).astype(int)
    assert np.abs(out[0] - [0, 128, 255]).max() <= 1


def test_dicom_window_clips_outside_values(tmp_path):
    pixels = np.array([[0, 100, 200, 4000]], np.uint16).repeat(2, axis=0)
    out = read_image(write_dicom(tmp_path / "c.dcm", pixels, WindowCenter=100, WindowWidth=200)).astype(int)
    assert out[0, 0] == 0 and abs(out[0, 1] - 128) <= 1 and out[0, 2] == 255 and out[0, 3] == 255


def test_dicom_sniffed_from_content_and_without_suffix(tmp_path):
    path = write_dicom(tmp_path / "IM0001", _two_tone())
    assert read_image(path)[0, -1] == 255
    assert decode_image(path.read_bytes(), "upload.png")[0, -1] == 255


def test_folder_scan_finds_suffixless_dicom_and_skips_hidden_files(tmp_path):
    from bonefrac.io import image_files

    (tmp_path / "SE1").mkdir()
    write_dicom(tmp_path / "SE1" / "IM0001", _two_tone())
    write_dicom(tmp_path / "SE1" / "1.2.826.0.1.3680043.2.1125.1.2277", _two_tone())  # named by its UID
    save(pattern(0), tmp_path / "b.png")
    (tmp_path / "._b.png").write_bytes(b"\0\5\x16\7 macOS resource fork")
    (tmp_path / "notes").write_text("not an image")
    (tmp_path / "notes.1").write_text("not an image either")
    assert [p.relative_to(tmp_path).as_posix() for p in image_files(tmp_path)] == [
        "SE1/1.2.826.0.1.3680043.2.1125.1.2277", "SE1/IM0001", "b.png"]


def test_dicom_unusable_window_warning_keeps_the_file_name_out_of_the_log(tmp_path, caplog):
    path = write_dicom(tmp_path / "DOE_JOHN.dcm", _two_tone().astype(np.uint16), WindowCenter=100, WindowWidth=0)
    with caplog.at_level("WARNING"):
        assert read_image(path).shape == _two_tone().shape  # the percentile window still works
    assert "VOI LUT/window" in caplog.text and "DOE_JOHN" not in caplog.text


@pytest.mark.parametrize("fmt", ["GIF", "ICO", "EPS"])
def test_formats_outside_the_list_are_refused(fmt, tmp_path):
    buf = io.BytesIO()
    img = Image.fromarray(pattern(1)).convert("RGB" if fmt == "EPS" else "L")
    try:
        img.save(buf, format=fmt)
    except OSError:  # EPS needs nothing to write, but be safe on odd Pillow builds
        pytest.skip(f"Pillow cannot write {fmt} here")
    with pytest.raises(ImageReadError, match="not a recognised image format"):
        decode_image(buf.getvalue(), f"x.{fmt.lower()}")


def colour_or_empty_dicom(path, sop_class, **tags):
    """An explicit-VR little-endian DICOM file of `sop_class` holding exactly `tags` (pydicom 3)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.set_original_encoding(False, True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_colour_ybr_dicom_is_converted_to_grey_once(tmp_path):
    from pydicom.pixels import convert_color_space
    from pydicom.uid import SecondaryCaptureImageStorage

    rgb = np.zeros((4, 6, 3), np.uint8)
    rgb[:, :3] = (200, 40, 40)
    rgb[:, 3:] = (30, 160, 220)
    path = colour_or_empty_dicom(tmp_path / "ybr.dcm", SecondaryCaptureImageStorage, Rows=4, Columns=6,
                                 SamplesPerPixel=3, PlanarConfiguration=0, PhotometricInterpretation="YBR_FULL",
                                 BitsAllocated=8, BitsStored=8, HighBit=7, PixelRepresentation=0,
                                 PixelData=convert_color_space(rgb, "RGB", "YBR_FULL").tobytes())
    expected = np.asarray(Image.fromarray(rgb).convert("L"), dtype=int)
    assert np.abs(read_image(path).astype(int) - expected).max() <= 2


def test_dicom_without_preamble_by_suffix(tmp_path):
    path = write_dicom(tmp_path / "raw.dcm", _two_tone(), preamble=False)
    assert path.read_bytes()[128:132] != b"DICM"
    assert read_image(path)[0, -1] == 255


def test_dicom_without_pixels_is_an_error(tmp_path):
    path = write_dicom(tmp_path / "bad.dcm", _two_tone())
    data = path.read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[: len(data) - 64])
    with pytest.raises(ImageReadError, match="cut.dcm"):
        read_image(tmp_path / "cut.dcm")


# --- failures -----------------------------------------------------------------------------------------------


def test_decode_sniffs_content_not_name():
    img = pattern(3)
    np.testing.assert_array_equal(decode_image(encoded(img, "PNG"), "photo.jpg"), img)


@pytest.mark.parametrize("name,content,reason", [
    ("empty.png", b"", "empty"),
    ("notes.png", b"just some text\n", "not a recognised image"),
    ("paper.png", b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<<>>\nendobj\n", "PDF"),
    ("garbage.jpg", b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "corrupt"),
])
def test_bad_files_raise_with_path_and_reason(tmp_path, name, content, reason):
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ImageReadError, match=reason) as info:
        read_image(tmp_path / name)
    assert name in str(info.value) and info.value.reason


def test_missing_file(tmp_path):
    with pytest.raises(ImageReadError, match="not found"):
        read_image(tmp_path / "nope.png")


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP"])
def test_truncated_files_are_errors_not_grey(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = encoded(rng.integers(0, 256, (256, 256), dtype=np.uint8), fmt)
    path = tmp_path / f"cut.{fmt.lower()}"
    path.write_bytes(data[: int(len(data) * 0.6)])
    with pytest.raises(ImageReadError, match="cut"):
        read_image(path)
    assert not ImageFile.LOAD_TRUNCATED_IMAGES


def test_decompression_bomb_refused_before_decoding(tmp_path):
    path = png_bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    start = time.perf_counter()
    with pytest.raises(ImageReadError, match="too large"):
        read_image(path)
    assert time.perf_counter() - start < 1.0  # decoding 400 megapixels would take far longer


def test_max_pixels_parameter_and_pil_warning_zone(tmp_path):
    with pytest.raises(ImageReadError, match="too large"):
        read_image(save(pattern(4), tmp_path / "s.png"), max_pixels=100)
    # 11000^2 = 121 Mpx: above our limit, but PIL itself would only warn
    with pytest.raises(ImageReadError, match="limit"):
        read_image(png_bomb(tmp_path / "mid.png", side=11000))
    assert MAX_PIXELS == 100_000_000


# --- resize and constants -----------------------------------------------------------------------------------


def test_resize_gray_shapes_and_antialias():
    checker = (np.indices((64, 64)).sum(axis=0) % 2 * 255).astype(np.uint8)
    small = resize_gray(checker, 16)
    assert small.shape == (16, 16) and small.dtype == np.uint8
    assert abs(float(small.mean()) - 127.5) < 3 and small.std() < 3  # averaged, not aliased
    assert resize_gray(checker, (8, 32)).shape == (8, 32)
    flat = np.full((30, 40), 77, np.uint8)
    assert (resize_gray(flat, (90, 120)) == 77).all()


def test_resize_gray_rejects_bad_input():
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4, 3), np.uint8), 2)
    with pytest.raises(ValueError):
        resize_gray(np.zeros((4, 4), np.uint8), 0)


def test_image_extensions():
    assert isinstance(IMAGE_EXTENSIONS, frozenset)
    assert {".jpg", ".png", ".webp", ".dcm", ".tiff"} <= IMAGE_EXTENSIONS


def test_decode_image_and_colour_one_decode_gives_both():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (600, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "PNG")
    gray, thumb = decode_image_and_colour(buf.getvalue(), "photo.png", thumbnail=256)
    assert np.array_equal(gray, decode_image(buf.getvalue(), "photo.png"))  # the same pixel contract
    assert thumb.dtype == np.uint8 and thumb.shape == (300, 250, 3)  # reduced by 2, never below 256 px
    assert np.allclose(thumb.mean(axis=(0, 1)), rgb.mean(axis=(0, 1)), atol=2)
    buf = io.BytesIO()
    Image.fromarray(rgb[..., 0]).save(buf, "PNG")
    assert decode_image_and_colour(buf.getvalue(), "grey.png")[1] is None  # grey files have no colour cue


def test_deep_image_scaling_in_blocks_matches_the_one_pass_formula():
    from bonefrac.io import _BLOCK_PIXELS, _scale_percentile, _scale_range

    rng = np.random.default_rng(0)
    arr = rng.normal(1000, 300, size=(_BLOCK_PIXELS // 500 + 7, 1000))  # several blocks, a ragged last one
    arr[3, :5] = [np.nan, np.inf, -np.inf, 1e9, -1e9]
    lo, hi = 400.0, 1600.0
    expected = np.rint(np.clip((np.nan_to_num(arr, nan=lo) - lo) * (255.0 / (hi - lo)), 0, 255)).astype(np.uint8)
    assert np.array_equal(_scale_range(arr, lo, hi), expected)
    ints = rng.integers(0, 4096, size=(300, 200), dtype=np.uint16)  # small: exact percentiles
    p_lo, p_hi = np.percentile(ints, (0.5, 99.5))
    assert np.array_equal(_scale_percentile(ints), _scale_range(ints.astype(np.float64), p_lo, p_hi))
    assert not _scale_percentile(np.full((50, 50), 7, np.uint16)).any()  # flat: all 0


@pytest.mark.parametrize("implicit", [True, False])
def test_dicom_without_preamble_is_read_by_content_whatever_its_name(implicit):
    pytest.importorskip("pydicom")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    from bonefrac.io import is_dicom_bytes

    gray = (np.arange(48 * 40).reshape(48, 40) % 200).astype(np.uint16)
    ds = Dataset()
    ds.Modality, ds.Rows, ds.Columns = "DX", 48, 40
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelData = (gray * 16).tobytes()
    raw = io.BytesIO()
    ds.save_as(raw, implicit_vr=implicit, little_endian=True)  # no preamble, no file meta
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID, ds.file_meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3"
    ds.SOPClassUID, ds.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", "1.2.3"
    part10 = io.BytesIO()
    ds.save_as(part10, enforce_file_format=True)
    expected = decode_image(part10.getvalue(), "ref.dcm")
    assert is_dicom_bytes(raw.getvalue()) and expected.max() == 255
    for name in ("IM0001", "scan.png", "scan.dcm"):
        assert np.array_equal(decode_image(raw.getvalue(), name), expected)
    with pytest.raises(ImageReadError, match="report.dcm"):
        decode_image(b"%PDF-1.4 not an image" * 10, "report.dcm")


# --- DICOM and TIFF corners (session 10 review) -------------------------------------------------------------


def test_dicom_padding_is_left_out_of_the_window_and_shown_black(tmp_path):
    body = np.full((60, 100), 1000, np.uint16)
    body[:, 50:] = 3000  # left half soft tissue, right half bone
    padded = body.copy()
    padded[:, :20] = padded[:, -20:] = 65535  # 40 % outside the collimator
    plain = read_image(write_dicom(tmp_path / "plain.dcm", body))
    got = read_image(write_dicom(tmp_path / "pad.dcm", padded, PixelPaddingValue=65535))
    # Counted in the window, the padding squashed bone to 8 of 255 and itself came out white.
    assert got[:, 25:50].max() == 0 and got[:, 50:80].min() == 255 == plain[:, 50:].min()
    assert got[:, :20].max() == 0 and got[:, -20:].max() == 0
    ranged = read_image(write_dicom(tmp_path / "range.dcm", np.where(padded == 65535, 60000, padded).astype(np.uint16),
                                    PixelPaddingValue=59000, PixelPaddingRangeLimit=65535))
    assert np.array_equal(ranged, got)


def test_16bit_min_is_white_tiff_is_inverted_like_8bit(tmp_path):
    ramp8 = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    ramp16 = ramp8.astype(np.uint16) * 257
    out = {}
    for bits, im in ((8, Image.fromarray(ramp8, "L")),
                     (16, Image.frombytes("I;16", ramp16.shape[::-1], ramp16.tobytes()))):
        buf = io.BytesIO()
        im.save(buf, "TIFF")
        data = bytearray(buf.getvalue())
        tag = bytes(data).find(b"\x06\x01\x03\x00\x01\x00\x00\x00\x01\x00")  # 262 SHORT x1 = 1 (min is black)
        assert tag > 0
        data[tag + 8] = 0  # -> 0: min is white
        out[bits] = decode_image(bytes(data), f"ramp{bits}.tif").astype(int)
    assert out[8][0, 0] == 255 and out[8][0, -1] == 0  # Pillow inverts 8-bit itself
    assert out[16][0, 0] == 255 and out[16][0, -1] == 0  # bonefrac must do it for 16-bit
    assert np.abs(out[16] - out[8]).max() <= 3


def _pydicom_example(name):
    from pathlib import Path

    path = Path(pydicom.__file__).parent / "data" / "test_files" / name
    if not path.is_file():
        pytest.skip(f"pydicom's example {name} is not installed")
    return path


@pytest.mark.parametrize("name", ["examples_palette.dcm", "examples_jpeg2k.dcm"])
def test_palette_and_jpeg2000_colour_dicom_give_the_luma_pydicom_shows(name):
    from pydicom.pixels import apply_color_lut

    path = _pydicom_example(name)
    ds = pydicom.dcmread(path)
    try:
        ref = ds.pixel_array  # RGB for YBR_RCT (the decoder's own transform)
    except Exception as exc:  # no JPEG 2000 decoder in this environment
        pytest.skip(f"pydicom cannot decode {name} here: {exc}")
    if ds.PhotometricInterpretation == "PALETTE COLOR":
        ref = apply_color_lut(ref, ds)  # was: the palette indices read as grey
        ref = (ref / np.iinfo(ref.dtype).max * 255).round().astype(np.uint8)
    expected = np.asarray(Image.fromarray(ref, "RGB").convert("L"), dtype=int)
    assert np.abs(read_image(path).astype(int) - expected).max() <= 1  # YBR_RCT was refused


def test_colour_dicom_scales_by_bits_stored(tmp_path):
    from pydicom.uid import SecondaryCaptureImageStorage

    rgb = np.zeros((4, 8, 3), np.uint16)
    rgb[:, 4:] = 4095  # full-scale white in 12 bits
    path = colour_or_empty_dicom(tmp_path / "rgb12.dcm", SecondaryCaptureImageStorage, Rows=4, Columns=8,
                                 SamplesPerPixel=3, PlanarConfiguration=0, PhotometricInterpretation="RGB",
                                 BitsAllocated=16, BitsStored=12, HighBit=11, PixelRepresentation=0,
                                 PixelData=rgb.astype("<u2").tobytes())
    img = read_image(path)
    assert img[0, -1] == 255 and img[0, 0] == 0  # was 16: divided by 65535


def test_undecodable_dicom_is_one_line_and_logs_no_traceback(caplog):
    from bonefrac.io import quiet_image_metadata_logs

    path = _pydicom_example("JPGExtended.dcm")
    quiet_image_metadata_logs()
    with caplog.at_level("DEBUG"):
        try:
            read_image(path)
        except ImageReadError as exc:
            assert "\n" not in exc.reason and "JPGExtended.dcm" in str(exc)
        else:  # a decoder for 12-bit JPEG Extended is installed here: nothing to check
            return
    assert not [r for r in caplog.records if r.levelno >= 40]  # pydicom's own ERROR with a traceback


def test_dicom_without_an_image_says_so(tmp_path):
    from pydicom.uid import BasicTextSRStorage

    path = colour_or_empty_dicom(tmp_path / "report.dcm", BasicTextSRStorage, Modality="SR")
    with pytest.raises(ImageReadError, match=r"report.dcm.*without an image.*Basic Text SR"):
        read_image(path)


def test_folder_scan_lists_broken_links_and_reading_one_says_so(tmp_path):
    import os

    from bonefrac.io import image_files

    save(pattern(0), tmp_path / "a.png")
    os.symlink(tmp_path / "moved" / "b.png", tmp_path / "b.png")
    os.symlink(tmp_path / "moved" / "IM0002", tmp_path / "IM0002")
    assert [p.name for p in image_files(tmp_path)] == ["IM0002", "a.png", "b.png"]  # links were dropped silently
    with pytest.raises(ImageReadError, match=r"b\.png: broken symbolic link \(its target .*moved/b\.png"):
        read_image(tmp_path / "b.png")


def test_predict_reports_a_broken_link_in_a_folder_as_an_error_row(tmp_path):
    import os

    from bonefrac.predict import predict_files

    class Stub:
        class_names, positive_index, threshold = ["no_fracture", "fracture"], 1, 0.5

        def predict_arrays(self, images):
            return np.tile([0.8, 0.2], (len(images), 1))

    save(pattern(0), tmp_path / "scans" / "a.png")
    os.symlink(tmp_path / "gone.png", tmp_path / "scans" / "b.png")
    rows = list(predict_files(Stub(), [str(tmp_path / "scans")], xray_check=False))
    assert [r["status"] for r in rows] == ["ok", "error"] and rows[1]["path"].endswith("b.png")
    assert rows[1]["error"].startswith("broken symbolic link")


def _compressed_dicom(path, transfer_syntax):
    """A DICOM file whose pixel data is encapsulated under `transfer_syntax` (the frame is not real JPEG)."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    write_dicom(path, np.zeros((4, 4), np.uint16))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xc3\x00\x0b\x10\x00\x04\x00\x04\x01\x01\x11\x00\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.80"])
def test_jpeg_lossless_dicom_without_its_decoder_names_the_extra(tmp_path, syntax):
    from importlib.util import find_spec

    if find_spec("libjpeg") or find_spec("gdcm"):
        pytest.skip("a JPEG Lossless decoder is installed here")
    path = _compressed_dicom(tmp_path / "cr.dcm", syntax)
    with pytest.raises(ImageReadError, match=r"cr\.dcm: cannot decode DICOM pixel data \(compressed as JPEG"
                                             r".*pip install 'bonefrac\[dicom-jpeg\]'") as caught:
        read_image(path)
    assert "\n" not in caught.value.reason


def test_the_dicom_extra_named_in_errors_exists():
    import tomllib
    from pathlib import Path

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    extra = pyproject["project"]["optional-dependencies"]["dicom-jpeg"]
    assert {r.split(">")[0] for r in extra} == {"pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg"}
