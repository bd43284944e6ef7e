"""DICOM for io.py's pixel contract: one file in, a 2-D uint8 array out where bone is bright.

Grey images: stored values -> padding masked (PixelPaddingValue, optionally a range to PixelPaddingRangeLimit:
the area outside the collimator) -> modality LUT (rescale slope/intercept) -> the file's VOI LUT or window, else
the 0.5-99.5 percentile window of the pixels that are not padding -> MONOCHROME1 inverted -> padding black.
Colour images (RGB, YBR, PALETTE COLOR) become ITU-R 601 luma of their full stored range. Multi-frame files give
their first frame. Every failure is an ImageReadError naming the file; its reason is one line.

`decode_dicom` is called by `io.decode_image` for bytes recognised as DICOM; nothing else needs this module.
"""

from __future__ import annotations

import contextlib
import io as _stdio
import logging
import zlib

import numpy as np
from PIL import Image

from .errors import ImageReadError
from .io import _check_size, _scale_percentile, _scale_range

log = logging.getLogger(__name__)
DEFLATED = b"1.2.840.10008.1.2.1.99"  # Deflated Explicit VR Little Endian: the whole dataset is one zlib stream
# Inflated bytes a deflated file may hold per allowed pixel (a 16-bit RGB sample is 6), plus its header elements.
_INFLATED_PER_PIXEL, _INFLATED_HEADERS = 8, 1 << 20
# Decoders that produce RGB from a colour transform of their own (JPEG 2000's RCT/ICT): convert nothing.
_CONVERT_TO_RGB = ("YBR_FULL", "YBR_FULL_422")
# Transfer syntaxes whose pixels need a pylibjpeg plugin (the `dicom-jpeg` extra) or GDCM. Installed by default,
# Pillow decodes 8-bit JPEG and JPEG 2000, and pydicom itself RLE; these it cannot.
_EXTRA_DECODERS = {
    "1.2.840.10008.1.2.4.51": "libjpeg",  # JPEG Extended, 12-bit samples
    "1.2.840.10008.1.2.4.57": "libjpeg",  # JPEG Lossless (process 14): the usual compressed CR/DX
    "1.2.840.10008.1.2.4.70": "libjpeg",  # JPEG Lossless, first-order prediction (SV1)
    "1.2.840.10008.1.2.4.80": "libjpeg",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81": "libjpeg",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.201": "openjpeg",  # High-Throughput JPEG 2000 (lossless)
    "1.2.840.10008.1.2.4.202": "openjpeg",  # HTJ2K lossless RPCL
    "1.2.840.10008.1.2.4.203": "openjpeg",  # HTJ2K
}


def decode_dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    """DICOM bytes -> (height, width) uint8, bone bright; ImageReadError(name, reason) when it cannot be."""
    try:
        import pydicom  # lazy: only DICOM users pay for the import
    except ImportError:
        raise ImageReadError(name, "DICOM file but pydicom is not installed (pip install pydicom)") from None
    _refuse_deflate_bomb(data, name, max_pixels)  # pydicom would inflate it whole, before any size check
    with _read_errors(name, "not a readable DICOM file"):
        ds = pydicom.dcmread(_stdio.BytesIO(data), force=True)
        pixels = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
        if "Rows" not in ds or "Columns" not in ds or not any(k in ds for k in pixels):
            raise ImageReadError(name, f"DICOM file without an image (no pixel data; {_sop_class(ds)})")
    with _read_errors(name, "not a readable DICOM image"):
        _default_transfer_syntax(ds)
        rows, cols = int(ds.Rows), int(ds.Columns)
    _check_size(cols, rows, name, max_pixels)
    with _read_errors(name, "cannot decode DICOM pixel data", ds):
        return _to_gray(_first_frame(ds, rows * cols, name, max_pixels), ds)


def deflated_start(data: bytes) -> int | None:
    """Where the zlib stream of a deflated DICOM starts, found as pydicom finds it (preamble optional, the file
    meta group read element by element, its group length not trusted); None when the file is not deflated."""
    from pydicom.filereader import _read_file_meta_info, read_preamble

    fp = _stdio.BytesIO(data)
    try:
        read_preamble(fp, True)
        meta = _read_file_meta_info(fp)
        syntax = str(meta.get("TransferSyntaxUID", "")).strip("\0 ")  # values are converted when read
    except Exception:  # pydicom's reading of the same bytes fails too, before inflating anything
        return None
    return fp.tell() if syntax.encode() == DEFLATED else None


def inflate_limit(max_pixels: int) -> int:
    """Bytes a deflated DICOM may inflate to: pydicom holds the whole inflated dataset (every frame) in memory."""
    return max_pixels * _INFLATED_PER_PIXEL + _INFLATED_HEADERS


def _refuse_deflate_bomb(data: bytes, name: str, max_pixels: int) -> None:
    """ImageReadError when a deflated file inflates past `inflate_limit`: a zlib stream of zeros shrinks ~1000:1,
    so a 60 MB upload could inflate to 60 GB. Counted by inflating in bounded steps (the output is dropped), so
    memory stays small whatever the file holds."""
    start = deflated_start(data)
    if start is None:
        return
    limit, total, step = inflate_limit(max_pixels), 0, 1 << 24
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    for offset in range(start, len(data), step):
        pending = data[offset:offset + step]
        while pending and not inflater.eof:
            try:
                total += len(inflater.decompress(pending, step))
            except zlib.error as exc:
                raise ImageReadError(name, f"corrupt deflated DICOM ({exc})") from None
            if total > limit:
                raise ImageReadError(name, f"image too large: deflated DICOM inflates to more than {limit:,} bytes "
                                           f"(the whole file, every frame, is inflated in memory; limit: "
                                           f"{_INFLATED_PER_PIXEL} bytes per allowed pixel)")
            pending = inflater.unconsumed_tail


@contextlib.contextmanager
def _read_errors(name: str, what: str, ds=None):
    """Turn any exception into ImageReadError(name, "<what>: <one line>"), adding the missing-decoder hint when
    `ds` is given. pydicom parses element values lazily, on first access, so a corrupt tag can raise anything
    (NotImplementedError, KeyError, ...) at any step, and one bad file must not stop a whole folder."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        hint = "" if ds is None else _missing_decoder(ds)
        raise ImageReadError(name, f"{what}{hint}: {_one_line(exc)}") from None


def _sop_class(ds) -> str:
    """The file's SOP class name (what the file is instead of an image), or "unknown kind"."""
    try:
        return getattr(ds.get("SOPClassUID"), "name", None) or "unknown kind"
    except Exception:  # a corrupt tag: the file is refused for having no image anyway
        return "unknown kind"


def _missing_decoder(ds) -> str:
    """A hint naming the `dicom-jpeg` extra when the file's transfer syntax needs a decoder of it that is not
    installed, else "". It goes before pydicom's text, which lists every plugin and gets cut short."""
    from importlib.util import find_spec

    try:
        syntax = ds.file_meta.get("TransferSyntaxUID") if getattr(ds, "file_meta", None) is not None else None
        plugin = _EXTRA_DECODERS.get(str(syntax))
    except Exception:  # a corrupt meta element: no hint, the reason itself still reaches the caller
        return ""
    if plugin is None or (find_spec("pylibjpeg") and find_spec(plugin)) or find_spec("gdcm"):
        return ""
    return f" (compressed as {syntax.name}: install its decoder with pip install 'bonefrac[dicom-jpeg]')"


def _one_line(exc: Exception) -> str:
    # pydicom's "no plugin can decode this" lists every plugin over many lines; one line fits logs and CSV cells.
    text = " ".join(line.strip() for line in str(exc).splitlines() if line.strip())
    return (text[:297] + "...") if len(text) > 300 else (text or type(exc).__name__)


def _default_transfer_syntax(ds) -> None:
    """A dataset without file meta (no preamble) names no transfer syntax, and pydicom then refuses its pixels:
    use the encoding it was read with (pydicom detects implicit/explicit VR and byte order)."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = getattr(ds, "original_encoding", None) or (ds.is_implicit_VR, ds.is_little_endian)
    if implicit is None:  # not read from bytes: DICOM's default encoding
        implicit, little = True, True
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def _luts():
    """(apply_modality_lut, apply_voi_lut, convert_color_space, apply_color_lut): pydicom 3.x, else 2.x."""
    try:
        from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
    except ImportError:  # pydicom 2.x
        from pydicom.pixel_data_handlers.util import (apply_color_lut, apply_modality_lut, apply_voi_lut,
                                                      convert_color_space)
    return apply_modality_lut, apply_voi_lut, convert_color_space, apply_color_lut


def _first_frame(ds, frame_pixels: int, name: str, max_pixels: int) -> np.ndarray:
    """Decode only the first frame where pydicom allows it (3.x), else all frames (2.x, size-checked)."""
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    try:
        from pydicom.pixels import pixel_array
    except ImportError:  # pydicom 2.x decodes every frame at once
        if frame_pixels * n_frames > max_pixels:
            raise ImageReadError(name, f"DICOM with {n_frames} frames is over the {max_pixels:,} pixel limit")
        arr = ds.pixel_array
        return arr[0] if n_frames > 1 else arr
    # as_rgb=False: pydicom 3 would convert YBR to RGB itself, and _to_gray converts once for both versions.
    return pixel_array(ds, index=0 if n_frames > 1 else None, as_rgb=False)


def _to_gray(arr: np.ndarray, ds) -> np.ndarray:
    apply_modality_lut, apply_voi_lut, convert_color_space, apply_color_lut = _luts()
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric == "PALETTE COLOR":  # the stored values are indices into colour tables
        rgb = apply_color_lut(arr, ds)
        return _luma(rgb, float(np.iinfo(rgb.dtype).max) if rgb.dtype.kind in "ui" else 1.0)
    if arr.ndim == 3:  # colour (e.g. a secondary capture): no grey LUTs, just luma
        if photometric in _CONVERT_TO_RGB and int(ds.get("SamplesPerPixel", 1)) == 3:
            arr = convert_color_space(arr, photometric, "RGB")
        return _luma(arr, _stored_max(arr, ds))
    padding = _padding_mask(arr, ds)
    values = np.asarray(apply_modality_lut(arr, ds))
    out = _apply_voi(values, ds, apply_voi_lut)
    if out is None:
        out = _scale_percentile(values, basis=None if padding is None else values[~padding])
    if photometric == "MONOCHROME1":  # MONOCHROME1 stores bone dark; the contract wants bone bright
        out = 255 - out
    if padding is not None:
        out[padding] = 0
    return out


def _stored_max(arr: np.ndarray, ds) -> float:
    """Full scale of integer pixels: 2**BitsStored - 1 (a 12-bit image in 16-bit words tops out at 4095)."""
    if arr.dtype.kind not in "ui":
        return 1.0
    bits = int(ds.get("BitsStored") or 0) or arr.dtype.itemsize * 8
    return float(2 ** min(bits, arr.dtype.itemsize * 8) - 1)


def _luma(rgb: np.ndarray, top: float) -> np.ndarray:
    scaled = Image.fromarray(_scale_range(rgb, 0, top), mode="RGB")
    return np.asarray(scaled.convert("L"), dtype=np.uint8).copy()


def _padding_mask(arr: np.ndarray, ds) -> np.ndarray | None:
    """True where the stored value is PixelPaddingValue (or between it and PixelPaddingRangeLimit): pixels
    outside the imaged field. None when the file declares no padding or no pixel carries it."""
    # Both tags are US or SS; pydicom resolves that from PixelRepresentation and returns ints.
    value = ds.get("PixelPaddingValue")
    if value is None:
        return None
    limit = ds.get("PixelPaddingRangeLimit")
    lo, hi = sorted((int(value), int(value if limit is None else limit)))
    mask = (arr >= lo) & (arr <= hi)
    return mask if mask.any() else None


def _apply_voi(values: np.ndarray, ds, apply_voi_lut) -> np.ndarray | None:
    """The file's VOI LUT or window scaled to 0..255, or None when the file has none (or a broken one)."""
    has_lut = bool(ds.get("VOILUTSequence"))
    has_window = ds.get("WindowCenter") is not None and ds.get("WindowWidth") is not None
    if not (has_lut or has_window):
        return None
    try:
        if has_lut:  # pydicom prefers the LUT when both are present
            # Clip to the table's input range ourselves: pydicom maps through the LUT's dtype, which wraps.
            n_entries, first = _lut_span(ds.VOILUTSequence[0])
            values = np.clip(np.rint(values), first, first + n_entries - 1).astype(np.int64)
            probe = np.arange(first, first + n_entries, dtype=np.int64)
        else:
            probe = np.array([-1e12, 1e12])  # windows clip to their output range y_min..y_max
        out = np.asarray(apply_voi_lut(values, ds, index=0), dtype=np.float64)
        ends = np.asarray(apply_voi_lut(probe, ds, index=0), dtype=np.float64)
    except Exception as exc:  # e.g. a window width of 0 or a malformed LUT: the percentile window still works
        # No file name: uploaded names often carry a patient's name, and logs must hold no identifiers.
        log.warning("ignoring unusable VOI LUT/window in a DICOM file: %s", _one_line(exc))
        return None
    lo, hi = float(ends.min()), float(ends.max())
    if hi <= lo:
        return None
    return _scale_range(out, lo, hi)


def _lut_span(item) -> tuple[int, int]:
    """(number of entries, first mapped value) of a VOI LUT item; 0 entries means 65536 (PS3.3 C.11.2.1.1)."""
    descriptor = [int(v) for v in item.LUTDescriptor]
    return descriptor[0] or 2**16, descriptor[1]
