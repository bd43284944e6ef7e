"""The one image reader of bonefrac: any supported file -> 2-D uint8 grayscale array.

Callers need three things from here:

* :func:`read_image` / :func:`decode_image` return a ``(height, width)`` ``numpy.uint8`` array where bone is
  bright (the pixel contract in ``docs/ARCHITECTURE.md``), or raise :class:`~bonefrac.errors.ImageReadError`
  naming the file and the reason. Nothing is ever silently repaired (truncated files are errors).
* :func:`resize_gray` is THE resize (PIL bilinear with antialiasing); training and prediction both use it so
  that a model sees the same pixels in both.
* :data:`IMAGE_EXTENSIONS` lists the file suffixes a folder scan should pick up; :func:`image_files` is that scan
  (broken symbolic links included, so that reading them reports them instead of dropping them silently).
"""

from __future__ import annotations

import hashlib
import io as _stdio
import logging
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

from .errors import ImageReadError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".webp", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"}
)
"""Lower-case suffixes of files a folder scan treats as images (DICOM files without a suffix are sniffed)."""

MAX_PIXELS = 100_000_000
"""Default refusal limit in pixels (width * height), checked from the header before decoding."""

DICOM_SUFFIXES = frozenset({".dcm", ".dicom"})
PIL_FORMATS = ("JPEG", "PNG", "WEBP", "BMP", "TIFF")
"""The only formats Pillow may open (its JPEG reader also takes phones' multi-picture JPEGs). Anything else, GIF,
ICO and above all EPS (which Pillow hands to Ghostscript), is refused as "not a recognised image format"."""
_PERCENTILES = (0.5, 99.5)
_PERCENTILE_SAMPLE = 1 << 22  # pixels the percentiles are estimated from
_BLOCK_PIXELS = 1 << 20  # pixels per float block while scaling


def is_dicom_bytes(data: bytes) -> bool:
    """True when ``data`` starts with the DICOM Part 10 preamble (128 bytes, then ``DICM``), or is a raw dataset
    without one (older PACS exports): a little-endian tag of group 0002 or 0008 first, then an explicit VR or a
    short implicit length. No image format starts that way (their magic bytes differ)."""
    if len(data) >= 132 and data[128:132] == b"DICM":
        return True
    if len(data) < 8 or data[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    return data[4:6] in _DICOM_VRS or int.from_bytes(data[4:8], "little") < 256


_DICOM_VRS = {vr.encode() for vr in "AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV "
              "TM UC UI UL UN UR US UT UV".split()}


def looks_like_image(file: Path) -> bool:
    """True for a file with an image suffix, or any other file that starts like DICOM (PACS exports name their
    files IM0001, or by UID such as 1.2.826.0.1.3680043.2.1125.1.2277, whose "suffix" is a number)."""
    if file.suffix.lower() in IMAGE_EXTENSIONS:
        return True
    try:
        with open(file, "rb") as handle:
            return is_dicom_bytes(handle.read(132))
    except OSError:
        return False


def image_files(folder: Path) -> list[Path]:
    """Every image or DICOM file below `folder` as :func:`walk_files` finds them, sorted.

    Broken symbolic links are included whatever their name: what they point to cannot be inspected, and a caller
    that reads them gets an ImageReadError saying so (a per-file error) rather than a file silently missing.
    """
    files, _ = walk_files(folder)
    return [f for f in files if is_broken_link(f) or (f.is_file() and looks_like_image(f))]


def ignored_name(name: str) -> bool:
    """True for names no scan looks at: hidden files and folders (".x", macOS "._x.png", .ipynb_checkpoints,
    .Trash-1000) and the __MACOSX metadata folder that macOS zip files carry."""
    return name.startswith(".") or name == "__MACOSX"


def walk_files(folder, seen: set[str] | None = None) -> tuple[list[Path], list[Path]]:
    """(every entry below `folder` that is not a folder, sorted; the folders skipped), THE folder walk. Links to
    folders are followed (``Path.rglob`` does not: linked images went missing), except into a folder whose real
    path is in `seen` (walked already, or reserved by the caller: prepare reserves the dataset root and every class
    folder, so a link in one class cannot list another class's images under its label) or that holds `folder`
    (a link up to a parent would walk everything beside it); skipped folders are logged. `seen` is updated.
    :func:`ignored_name` names are skipped at any depth."""
    files, skipped = [], []
    seen = set() if seen is None else seen
    top = os.path.realpath(folder)
    seen.add(top)
    for here, dirs, names in os.walk(folder, followlinks=True, onerror=_unlistable):
        kept = []
        for name in sorted(n for n in dirs if not ignored_name(n)):
            real = os.path.realpath(os.path.join(here, name))
            if real in seen or top.startswith(real.rstrip(os.sep) + os.sep):
                log.warning("skipping %s: it leads to %s, a folder scanned already, another class's folder or one "
                            "holding %s", os.path.join(here, name), real, folder)
                skipped.append(Path(here, name))
            else:
                seen.add(real)
                kept.append(name)
        dirs[:] = kept  # os.walk descends only into what is left here
        files += [Path(here, n) for n in names if not ignored_name(n)]
    return sorted(files), sorted(skipped)


def _unlistable(exc: OSError) -> None:  # os.walk would skip an unreadable folder without a word
    log.warning("cannot list folder %s: %s", exc.filename, exc.strerror or exc)


def is_broken_link(path: Path) -> bool:
    """True for a symbolic link whose target does not exist (or a loop of links): nothing can be read from it."""
    return path.is_symlink() and not path.exists()


def read_image(path, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Read an image file as a 2-D uint8 grayscale array (bone bright).

    Supports JPEG, PNG (8/16-bit), WebP, BMP, TIFF (8/16-bit, float), DICOM (``.dcm`` or any file with the
    DICM preamble). Raises ImageReadError (message names ``path`` and the reason) for a missing, empty,
    truncated, corrupt or non-image file, and for images over ``max_pixels`` (checked before decoding).
    """
    return decode_image(read_bytes(path), str(path), max_pixels=max_pixels)


def read_image_and_colour(path, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`read_image` plus the small RGB thumbnail of :func:`decode_image_and_colour` (None for grey
    sources), for the not-an-X-ray check."""
    return decode_image_and_colour(read_bytes(path), str(path), max_pixels)


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes, read in blocks (OSError when it cannot be read): the one file hash behind
    manifests, model versions and the image cache's change check."""
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def write_atomically(path, write) -> None:
    """Call `write(tmp)` to fill a temporary file beside `path`, then rename it to `path`: a reader, or a run
    stopped half-way, sees the old file or the new one, never half of one (the temporary file is removed when
    `write` fails)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".part")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_bytes(path) -> bytes:
    """The file's bytes, or ImageReadError naming it: not found, a broken symbolic link, a folder, unreadable."""
    path = Path(path)
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ImageReadError(path, broken_link_reason(path) if path.is_symlink() else "file not found") from None
    except IsADirectoryError:
        raise ImageReadError(path, "is a directory, not a file") from None
    except OSError as exc:
        raise ImageReadError(path, f"cannot read file: {exc.strerror or exc}") from None


def broken_link_reason(link: Path) -> str:
    """The reason a broken symbolic link cannot be read, naming its missing target, for error rows and reports."""
    try:
        return f"broken symbolic link (its target {os.readlink(link)} does not exist)"
    except OSError:
        return "broken symbolic link"


def decode_image(data: bytes, name: str, max_pixels: int = MAX_PIXELS) -> np.ndarray:
    """Decode image bytes as :func:`read_image` does; ``name`` is only used in error messages.

    The format is sniffed from the content. The name's suffix is used only as a last resort, to try DICOM
    files that lack the 128-byte preamble when nothing else recognises the bytes.
    """
    return decode_image_and_colour(data, name, max_pixels, thumbnail=0)[0]


def decode_image_and_colour(data: bytes, name: str, max_pixels: int = MAX_PIXELS,
                            thumbnail: int = 256) -> tuple[np.ndarray, np.ndarray | None]:
    """:func:`decode_image` plus, from the same single decode, an RGB uint8 thumbnail (reduced by a whole
    factor to about ``thumbnail`` px, never below) when the file stores colour; None for grey files and DICOM.
    The not-an-X-ray check reads its colour cue from it without decoding the file twice."""
    if not data:
        raise ImageReadError(name, "empty file (0 bytes)")
    if is_dicom_bytes(data):
        return _dicom(data, name, max_pixels), None
    try:
        return _decode_pil(data, name, max_pixels, thumbnail)
    except ImageReadError as pil_error:
        if Path(name).suffix.lower() not in DICOM_SUFFIXES:
            raise
        try:
            return _dicom(data, name, max_pixels), None
        except ImageReadError as dicom_error:  # both reasons: a PNG or JPEG may have been saved as .dcm
            raise ImageReadError(name, f"{pil_error.reason} (and not DICOM either: {dicom_error.reason})") from None


def _dicom(data: bytes, name: str, max_pixels: int) -> np.ndarray:
    from .dicom import decode_dicom  # lazy: only DICOM users pay for pydicom (and dicom.py imports this module)

    return decode_dicom(data, name, max_pixels)


def resize_gray(img: np.ndarray, size) -> np.ndarray:
    """Resize a 2-D uint8 image to ``size`` (int = square ``size x size``, or ``(height, width)``).

    PIL bilinear; Pillow widens the filter when shrinking, so downscaling is antialiased. Returns uint8.
    """
    if not isinstance(img, np.ndarray) or img.ndim != 2 or img.dtype != np.uint8:
        raise ValueError(f"resize_gray needs a 2-D uint8 array, got {getattr(img, 'dtype', type(img))} "
                         f"with shape {getattr(img, 'shape', None)}")
    height, width = (size, size) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))
    if height < 1 or width < 1:
        raise ValueError(f"resize_gray size must be positive, got {size!r}")
    if img.shape == (height, width):
        return img.copy()
    pil = Image.fromarray(img, mode="L")
    return np.asarray(pil.resize((width, height), resample=Image.Resampling.BILINEAR))


# --- PIL formats -------------------------------------------------------------------------------------------


def _decode_pil(data: bytes, name: str, max_pixels: int,
                thumbnail: int) -> tuple[np.ndarray, np.ndarray | None]:
    """Open with PIL (header only), check the size, then fully decode and convert to the pixel contract;
    also a colour thumbnail when ``thumbnail`` > 0 and the image has colour."""
    try:
        # PIL warns between its own limit and twice it; our max_pixels check is the policy, so silence it.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(_stdio.BytesIO(data), formats=PIL_FORMATS) as im:
                _check_size(im.width, im.height, name, max_pixels)
                _refuse_deep_colour(im, data, name)
                im.load()  # raises on truncation because LOAD_TRUNCATED_IMAGES stays False
                # Pillow inverts 1- and 8-bit "min is white" TIFFs itself, but not 16-bit ones.
                min_is_white = im.format == "TIFF" and im.tag_v2.get(262) == 0
                im = ImageOps.exif_transpose(im)  # show it the way a viewer does
                return _pil_to_gray(im, min_is_white), _colour_thumbnail(im, thumbnail)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(name, f"image too large (decompression bomb guard): {exc}") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError(name, f"not a recognised image format ({_describe(data)})") from None
    except MemoryError:
        raise ImageReadError(name, "out of memory while decoding") from None
    except Exception as exc:  # PIL plugins raise many types (OSError, SyntaxError, ValueError...) on bad data
        raise ImageReadError(name, f"corrupt or truncated image: {exc}") from None


def _refuse_deep_colour(im: Image.Image, data: bytes, name: str) -> None:
    """ImageReadError for colour files of more than 8 bits a sample: Pillow reads them as 8-bit, keeping only each
    sample's high byte (12-bit data in 16-bit words turns almost black). 16-bit greyscale is read exactly."""
    # The PNG header (IHDR, always first) holds bit depth and colour type; Pillow does not keep them.
    if im.format == "PNG" and data[12:16] == b"IHDR" and data[24] == 16 and data[25] in (2, 4, 6):
        kind = {2: "RGB", 4: "grey+alpha", 6: "RGBA"}[data[25]]
        raise ImageReadError(name, f"16-bit colour PNG ({kind}): Pillow would keep only the high byte of each "
                                   "sample; save it as 16-bit greyscale or DICOM")
    if im.format == "TIFF":
        bits, samples = im.tag_v2.get(258, (1,)), im.tag_v2.get(277, 1)
        bits = max(bits) if isinstance(bits, tuple) else bits
        if samples > 1 and bits > 8:
            raise ImageReadError(name, f"{bits}-bit colour TIFF ({samples} samples a pixel): Pillow would keep only "
                                       "the high byte of each sample; save it as 16-bit greyscale or DICOM")


def _check_size(width: int, height: int, name: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ImageReadError(name, f"invalid image size {width}x{height}")
    if width * height > max_pixels:
        raise ImageReadError(
            name, f"image too large: {width}x{height} = {width * height:,} pixels > limit {max_pixels:,}"
        )


def printable_path(path) -> str:
    """`path` as text that any output (UTF-8 CSV, JSON, a strict terminal) can hold: bytes of a file name that
    are not UTF-8 (e.g. a Latin-1 name on Linux) become backslash escapes instead of crashing the writer."""
    return str(path).encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def quiet_image_metadata_logs() -> None:
    """Keep Pillow's and pydicom's DEBUG lines out of the logs whatever the root level: they print TIFF/EXIF tag
    and DICOM element values, text that can name a patient. Called by the CLI and the service at start-up."""
    for name in ("PIL", "pydicom"):
        logging.getLogger(name).setLevel(logging.INFO)
    # pydicom logs a full traceback at ERROR for every compressed file it has no decoder for; the reason
    # reaches the caller anyway, as the ImageReadError for that file.
    logging.getLogger("pydicom.pixels").setLevel(logging.CRITICAL)


def _colour_thumbnail(im: Image.Image, size: int) -> np.ndarray | None:
    if size <= 0 or im.mode in ("1", "L", "LA", "La", "I", "F") or im.mode.startswith("I;"):
        return None
    rgb = im.convert("RGB")
    factor = max(rgb.width, rgb.height) // size
    return np.asarray(rgb.reduce(factor) if factor > 1 else rgb, dtype=np.uint8)  # box reduce: cheap


def _pil_to_gray(im: Image.Image, min_is_white: bool = False) -> np.ndarray:
    """Convert any PIL mode to the contract: 8-bit luma, alpha on black, deep images percentile-scaled (and
    inverted when `min_is_white`: a 16-bit TIFF whose photometric says 0 is white)."""
    mode = im.mode
    if mode in ("I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im)
        if arr.ndim == 3:  # multi-channel deep data: use the first channel rather than guess a colour model
            arr = arr[..., 0]
        out = _scale_percentile(arr)  # no float copy of the whole image: scaled in blocks
        return 255 - out if min_is_white else out
    if mode == "L":
        return np.asarray(im, dtype=np.uint8).copy()
    has_alpha = mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info
    if has_alpha:
        rgba = im.convert("RGBA")
        black = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        im = Image.alpha_composite(black, rgba)
    # Pillow's RGB->L conversion is ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000.
    return np.asarray(im.convert("RGB").convert("L"), dtype=np.uint8).copy()


def _describe(data: bytes) -> str:
    """A short hint of what the bytes are, for error messages."""
    head = data[:12]
    magic = {b"\xff\xd8\xff": "JPEG", b"\x89PNG": "PNG", b"BM": "BMP", b"II*\0": "TIFF", b"MM\0*": "TIFF",
             b"GIF8": "GIF"}
    kind = next((k for m, k in magic.items() if head.startswith(m)), None)
    if kind or (head[:4] == b"RIFF" and head[8:12] == b"WEBP"):
        return f"corrupt {kind or 'WebP'} header"
    if head.startswith(b"%PDF"):
        return "looks like a PDF document"
    if head[:2] in (b"PK",):
        return "looks like a ZIP archive"
    if head.lstrip().startswith((b"<", b"{", b"[")):
        return "looks like text/HTML/JSON"
    try:
        data[:64].decode("utf-8")
        return "looks like a text file"
    except UnicodeDecodeError:
        return f"unknown content starting {head.hex()}"


def _scale_percentile(arr: np.ndarray, basis: np.ndarray | None = None) -> np.ndarray:
    """Linear map of the 0.5-99.5 percentile range of `basis` (default: `arr` itself; DICOM passes the pixels
    that are not padding) to 0..255 (flat images become 0). From 8 M pixels on the percentiles come from an
    evenly strided sample of 4-8 M of them (a view, no copy): exact percentiles of a 60 M pixel image would need
    several full-size copies."""
    basis = arr if basis is None else basis
    flat = basis.reshape(-1)
    sample = flat[::max(1, flat.size // _PERCENTILE_SAMPLE)]
    if sample.dtype.kind == "f":
        sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = np.percentile(sample, _PERCENTILES)
    if hi <= lo:  # very peaked histogram: fall back to the full range before giving up
        lo, hi = _finite_range(basis)
    return _scale_range(arr, lo, hi)


def _finite_range(arr: np.ndarray) -> tuple[float, float]:
    finite = arr[np.isfinite(arr)] if arr.dtype.kind == "f" else arr
    return float(finite.min()), float(finite.max())


def _scale_range(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """uint8 of `arr` with lo..hi mapped linearly to 0..255 (clipped; NaN -> 0), computed in float blocks of
    rows so a large image costs its uint8 result, not float copies of itself."""
    out = np.zeros(arr.shape, dtype=np.uint8)
    if hi <= lo:
        return out
    scale = 255.0 / (hi - lo)
    rows = max(1, _BLOCK_PIXELS // max(1, arr[0].size if arr.ndim > 1 else 1))
    for start in range(0, arr.shape[0], rows):
        block = np.nan_to_num(arr[start:start + rows].astype(np.float64), nan=lo, posinf=hi, neginf=lo)
        block -= lo
        block *= scale
        np.clip(block, 0.0, 255.0, out=block)
        out[start:start + rows] = np.rint(block)
    return out
