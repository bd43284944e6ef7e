"""A server-wide budget of decoded pixels: an upload is weighed from its header before it is decoded, then waits
(first come, first served) until its pixels fit beside those already being decoded. Pixels are weighed by their
decoded size (an 8-bit grey pixel 1, RGBA 4, 16-bit 2), which is what memory holds.

    budget = PixelBudget(settings.max_pixels_in_flight)
    weight = await asyncio.to_thread(upload_pixels, data, name, settings.max_pixels)
    lease = await budget.acquire(weight)   # waits; a weight over the whole budget is capped (it then runs alone)
    ...decode...
    budget.release(lease)

Why: the request-size cap counts compressed bytes. A flat PNG, an RGBA PNG or a deflated DICOM compresses about
1000:1, so a few requests of under 1 MB each decoded to gigabytes at once. BONEFRAC_MAX_PIXELS caps one image;
this caps all of them together.
"""

from __future__ import annotations

import asyncio
import io
import logging
import warnings
import zlib
from collections import deque
from pathlib import Path

from PIL import Image

from ..dicom import deflated_start, inflate_limit
from ..io import DICOM_SUFFIXES, PIL_FORMATS, is_dicom_bytes

log = logging.getLogger(__name__)
_HEADER_BYTES = 4 << 20  # of a deflated DICOM, inflated to find its size: headers are KB, pixels come last
_PIXEL_TAGS = (0x7FE00008, 0x7FE00009, 0x7FE00010)  # FloatPixelData, DoubleFloatPixelData, PixelData
_SAMPLE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I;16N": 2, "I": 4, "F": 4}  # PIL modes of wide samples


class PixelBudget:
    """An asyncio semaphore counted in pixels, strictly FIFO: a large upload is not overtaken forever by small
    ones. Loop-agnostic (each waiter's future comes from the running loop), so an app can be started twice."""

    def __init__(self, capacity: int):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self.capacity, self.in_use, self.peak = capacity, 0, 0
        self._waiters: deque = deque()  # [weight, future], in arrival order

    async def acquire(self, weight: int) -> int:
        """Wait until `weight` pixels (at most the capacity) fit; returns the weight to `release`."""
        weight = min(max(0, int(weight)), self.capacity)
        if weight == 0:  # refused from its header (upload_pixels): holds nothing, so waits for nothing
            return 0
        if not self._waiters and self.in_use + weight <= self.capacity:
            self._take(weight)
            return weight
        entry = (weight, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except asyncio.CancelledError:
            if entry[1].done() and not entry[1].cancelled():
                self.release(weight)  # granted just as the waiter gave up: hand it on
            else:
                if entry in self._waiters:  # else _wake skipped it already
                    self._waiters.remove(entry)
                self._wake()  # the next in line may fit now that this one left
            raise
        return weight

    def release(self, weight: int) -> None:
        self.in_use -= weight
        self._wake()

    def _take(self, weight: int) -> None:
        self.in_use += weight
        self.peak = max(self.peak, self.in_use)

    def _wake(self) -> None:
        while self._waiters and self.in_use + self._waiters[0][0] <= self.capacity:
            weight, fut = self._waiters.popleft()
            if not fut.done():
                self._take(weight)
                fut.set_result(None)


def upload_pixels(data: bytes, name: str, max_pixels: int) -> int:
    """What decoding `data` (as io.decode_image_and_colour does) will hold, read from its header, in bytes of
    decoded samples (an 8-bit grey pixel counts 1, RGBA 4, 16-bit grey 2): width x height x bands x bytes per
    sample, times the frames for DICOM (pydicom 2 decodes them all; a deflated file is inflated whole). 0 for a
    file that the decoder refuses from its header alone, before any pixel is decoded (over max_pixels, or no
    image format it knows). `max_pixels` when the header cannot be read. Never raises."""
    try:
        if is_dicom_bytes(data):
            return _dicom_pixels(data, max_pixels)
        try:
            return _pil_pixels(data, max_pixels)
        except Image.UnidentifiedImageError:
            if Path(name).suffix.lower() in DICOM_SUFFIXES:  # the decoder tries such files as DICOM next
                return _dicom_pixels(data, max_pixels)
            return 0  # refused as "not a recognised image format" by the same header read
    except Exception as exc:  # a damaged header: the decoder will say what is wrong; weigh it as the largest
        log.debug("cannot read the size of an upload from its header (%s): weighed as %d pixels",
                  type(exc).__name__, max_pixels)
        return max_pixels


def _pil_pixels(data: bytes, max_pixels: int) -> int:
    # Only the first frame is ever decoded (multi-page TIFF, animated PNG and WebP), so frames do not count.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=PIL_FORMATS) as im:
                pixels, per_pixel = im.width * im.height, len(im.getbands()) * _SAMPLE_BYTES.get(im.mode, 1)
    except Image.DecompressionBombError:
        return 0  # refused from the header too
    return pixels * per_pixel if 0 < pixels <= max_pixels else 0


def _dicom_pixels(data: bytes, max_pixels: int) -> int:
    """rows x columns x frames from the DICOM header; 0 when the decoder refuses the file from its header alone
    (a frame over `max_pixels`, or a deflated file whose pixel data is longer than it may inflate to), so such a
    file holds no budget while it is refused; `max_pixels` when the header does not say."""
    import pydicom

    start = deflated_start(data)
    pixel_bytes = 0
    if start is not None:  # pydicom inflates the whole dataset, pixels included, even to read only its header
        ds, pixel_bytes = _deflated_header(data, start)
        if pixel_bytes > inflate_limit(max_pixels):
            return 0
    else:
        ds = pydicom.dcmread(io.BytesIO(data), force=True, stop_before_pixels=True)
    if "Rows" not in ds or "Columns" not in ds:
        return max_pixels
    frame = int(ds.Rows) * int(ds.Columns)
    if frame > max_pixels:
        return 0
    per_pixel = max(1, int(ds.get("SamplesPerPixel", 1) or 1)) * max(1, -(-int(ds.get("BitsAllocated", 8) or 8) // 8))
    # A deflated file's pixel data is inflated whole, whatever Rows and Columns say.
    return max(frame * per_pixel * max(1, int(ds.get("NumberOfFrames", 1) or 1)), pixel_bytes) or max_pixels


def _deflated_header(data: bytes, start: int):
    """(dataset up to the pixel data, pixel data length in bytes) from a bounded inflation of the start."""
    from pydicom.filereader import read_dataset

    inflater, head, step = zlib.decompressobj(-zlib.MAX_WBITS), bytearray(), 1 << 16
    for offset in range(start, len(data), step):
        head += inflater.decompress(data[offset:offset + step], _HEADER_BYTES - len(head))
        if len(head) >= _HEADER_BYTES or inflater.eof:
            break
    found = []

    def at_pixels(tag, vr, length) -> bool:
        if tag in _PIXEL_TAGS:
            found.append(length if length != 0xFFFFFFFF else 0)
            return True
        return False

    ds = read_dataset(io.BytesIO(bytes(head)), is_implicit_VR=False, is_little_endian=True, stop_when=at_pixels)
    return ds, (found[0] if found else 0)
