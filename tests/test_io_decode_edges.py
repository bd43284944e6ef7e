"""Decode failures that must stay per-file ImageReadErrors with a useful reason: corrupt DICOM tags, colour files
deeper than 8 bits, and files named .dcm that are neither DICOM nor a readable image."""

import random
import struct
import zlib

import numpy as np
import pytest

from bonefrac.errors import BonefracError, ImageReadError
from bonefrac.io import decode_image, read_image
from conftest import pattern, save

pydicom = pytest.importorskip("pydicom")


def dicom_without_pixels(path, corrupt_sop_class=False):
    """A DICOM file holding only its SOP class and instance UIDs; with `corrupt_sop_class` the SOPClassUID element
    gets an unknown VR, which pydicom raises NotImplementedError for when the value is first read."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SpecificCharacterSet = "ISO_IR 100"  # a sound first element: pydicom guesses the VR encoding from it
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.save_as(path, enforce_file_format=True)
    if corrupt_sop_class:
        data = path.read_bytes()
        tag = b"\x08\x00\x16\x00UI"
        assert data.count(tag) == 1
        path.write_bytes(data.replace(tag, b"\x08\x00\x16\x00U\xff"))
    return path


def test_a_corrupt_dicom_tag_is_an_image_read_error_naming_the_file(tmp_path):
    path = dicom_without_pixels(tmp_path / "IM0002.dcm", corrupt_sop_class=True)
    with pytest.raises(ImageReadError, match="IM0002.dcm: .*no pixel data"):
        read_image(path)


def test_a_corrupt_dicom_does_not_stop_a_cache_build_or_a_folder_prediction(tmp_path):
    from bonefrac.cache import build_cache
    from bonefrac.predict import predict_files

    good = save(pattern(0), tmp_path / "scans" / "IM0001.png")
    bad = dicom_without_pixels(tmp_path / "scans" / "IM0002.dcm", corrupt_sop_class=True)
    with pytest.raises(BonefracError, match="could not be read.*IM0002.dcm"):
        build_cache([str(good), str(bad)], ["", ""], 16, tmp_path / "cache", workers=1, progress=False)

    class Stub:
        class_names, positive_index, threshold = ["no_fracture", "fracture"], 1, 0.5

        def predict_arrays(self, images):
            return np.tile([0.8, 0.2], (len(images), 1))

    rows = list(predict_files(Stub(), [tmp_path / "scans"], xray_check=False))
    assert [r.get("error") is None for r in rows] == [True, False]
    assert "IM0002.dcm" in rows[1]["path"] and "no pixel data" in rows[1]["error"]


@pytest.mark.filterwarnings("ignore")
def test_mutated_dicom_files_raise_image_read_errors_only(tmp_path):
    from test_io import write_dicom

    data = write_dicom(tmp_path / "a.dcm", np.arange(64, dtype=np.uint16).reshape(8, 8) * 50).read_bytes()
    rng = random.Random(0)
    for _ in range(300):  # a small, seeded fuzz: any other exception type would stop a whole folder
        case = bytearray(data)
        for _ in range(rng.choice([1, 2, 4])):
            i = rng.randrange(len(case))
            case[i] = rng.randrange(256)
        try:
            decode_image(bytes(case), "fuzz.dcm")
        except ImageReadError:
            pass


# --- colour deeper than 8 bits --------------------------------------------------------------------------------


def png16(pixels: np.ndarray, colour_type: int) -> bytes:
    """A 16-bit PNG of `pixels` (height, width, samples) written by hand: Pillow cannot write 16-bit colour."""
    def chunk(kind, body):
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    raw = b"".join(b"\0" + row.astype(">u2").tobytes() for row in pixels)
    header = struct.pack(">IIBBBBB", pixels.shape[1], pixels.shape[0], 16, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


def tiff16(samples: int, value: int = 4095, width: int = 4, height: int = 3) -> bytes:
    """An uncompressed little-endian TIFF of `samples` (3: RGB, 4: RGBA) 16-bit samples a pixel."""
    pixels = np.full((height, width, samples), value, "<u2").tobytes()
    tags = [(256, 3, 1, width), (257, 3, 1, height), (258, 3, samples, "bits"), (259, 3, 1, 1), (262, 3, 1, 2),
            (273, 4, 1, "data"), (277, 3, 1, samples), (278, 3, 1, height), (279, 4, 1, len(pixels)),
            (284, 3, 1, 1)] + ([(338, 3, 1, 2)] if samples == 4 else [])
    bits_at = 8 + 2 + 12 * len(tags) + 4
    where = {"bits": bits_at, "data": bits_at + 2 * samples}
    entries = b"".join(struct.pack("<HHI", tag, kind, count) + struct.pack("<HH" if kind == 3 else "<I",
                                                                             *((where.get(v, v), 0) if kind == 3
                                                                               else (where.get(v, v),)))
                       for tag, kind, count, v in tags)
    return (b"II*\0" + struct.pack("<IH", 8, len(tags)) + entries + struct.pack("<I", 0)
            + struct.pack(f"<{samples}H", *[16] * samples) + pixels)


@pytest.mark.parametrize("colour_type,channels,kind", [(2, 3, "RGB"), (4, 2, "grey\\+alpha"), (6, 4, "RGBA")])
def test_16bit_colour_png_is_refused_not_cut_to_its_high_byte(colour_type, channels, kind):
    with pytest.raises(ImageReadError, match=f"16-bit colour PNG \\({kind}\\).*16-bit greyscale or DICOM"):
        decode_image(png16(np.full((3, 4, channels), 4095), colour_type), "scan.png")


@pytest.mark.parametrize("samples", [3, 4])
def test_48_and_64_bit_tiff_is_refused(samples):
    with pytest.raises(ImageReadError, match=f"16-bit colour TIFF \\({samples} samples"):
        decode_image(tiff16(samples), "scan.tif")


def test_16bit_greyscale_png_still_reads_its_full_range():
    img = np.zeros((3, 4, 1), np.uint16)
    img[:, 2:] = 4095  # 12-bit data: Pillow's high byte alone would be 15, nearly black
    out = decode_image(png16(img, 0), "scan.png")
    assert out[0, 0] == 0 and out[0, -1] == 255


# --- .dcm files that are neither -----------------------------------------------------------------------------


def test_a_corrupt_png_named_dcm_reports_both_reasons(tmp_path):
    data = save(pattern(1, (256, 256)), tmp_path / "x.png").read_bytes()
    path = tmp_path / "scan.dcm"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ImageReadError, match=r"scan.dcm: corrupt or truncated image: .*\(and not DICOM either: "):
        read_image(path)


def _deflated_dicom(rows: int, cols: int, pixel_bytes: int) -> bytes:
    """A deflated Part 10 file of rows x cols whose PixelData holds `pixel_bytes` zero bytes (compresses ~1000:1)."""
    import io

    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import DeflatedExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(pixel_bytes)
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def test_a_deflated_dicom_that_inflates_far_past_the_pixel_limit_is_refused_before_inflating():
    """pydicom inflates the whole dataset before any size check: a small upload could become gigabytes."""
    from bonefrac.io import decode_image

    bomb = _deflated_dicom(100, 100, 8 << 20)  # 8 MB of pixel data behind a 100 x 100 header
    assert len(bomb) < 100_000
    with pytest.raises(ImageReadError, match="too large: deflated DICOM inflates to more than"):
        decode_image(bomb, "bomb.dcm", max_pixels=20_000)
    fine = _deflated_dicom(100, 100, 100 * 100)
    assert decode_image(fine, "fine.dcm", max_pixels=20_000).shape == (100, 100)


@pytest.mark.parametrize("variant", ["no group length", "no preamble", "wrong group length"])
def test_the_deflate_check_finds_the_stream_as_pydicom_does(variant):
    """The check trusted the group length at a fixed offset after DICM: without it, without a preamble, or with a
    wrong one, it was skipped and pydicom inflated the whole file."""
    from bonefrac.io import decode_image

    bomb = _deflated_dicom(100, 100, 8 << 20)
    assert bomb[132:136] == b"\x02\x00\x00\x00"  # (0002,0000) group length, right after DICM
    if variant == "no group length":
        bomb = bomb[:132] + bomb[144:]
    elif variant == "no preamble":
        bomb = bomb[132:]
    else:
        bomb = bomb[:140] + (int.from_bytes(bomb[140:144], "little") + 7).to_bytes(4, "little") + bomb[144:]
    with pytest.raises(ImageReadError, match="too large: deflated DICOM inflates to more than"):
        decode_image(bomb, "bomb.dcm", max_pixels=20_000)
