"""Robustness run against a live `bonefrac serve`: a corpus of bad inputs, then a seeded fuzz run.

    python benchmarks/serve_robustness.py [--model CKPT] [--fuzz 300] [--seed 0] [--json F]

Pass criteria: zero 5xx responses, zero dropped connections, and the server still healthy and correct after.
The fuzz cases are mutations (bit flips, truncations, splices, random bytes, odd file names and content types)
of real PNG/JPEG/WebP/DICOM files, drawn from numpy's seeded generator so a failure can be replayed.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import struct
import tempfile
import time
import zlib
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from live_server import ROOT, fresh_checkpoint, serving

log = logging.getLogger("bench")


def _encode(arr, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 20_000) -> bytes:
    """A valid grey PNG of side x side zeros: ~400 MB of pixels in a few hundred kB."""
    comp, parts, row = zlib.compressobj(9), [], b"\0" * (side + 1)
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", b"".join(parts)) + _chunk(b"IEND", b"")


def dicom(gray: np.ndarray, rows: int | None = None, truncate: bool = False) -> bytes:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.1", generate_uid()
    fm.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x", {}, file_meta=fm, preamble=b"\0" * 128)
    ds.Rows, ds.Columns = rows or gray.shape[0], gray.shape[1]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    pixels = gray.tobytes()
    ds.PixelData = pixels[: len(pixels) // 2] if truncate else pixels
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def seeds() -> dict[str, bytes]:
    from bonefrac.io import read_image

    gray = read_image(sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))[0])[:256, :256].copy()
    return {"png": _encode(gray, "PNG"), "jpeg": _encode(gray, "JPEG"), "webp": _encode(gray, "WEBP"),
            "dicom": dicom(gray)}


def corpus(s: dict[str, bytes]) -> list[tuple[str, dict]]:
    """(name, httpx request kwargs) of known-bad requests."""
    def upload(name, data, ctype="application/octet-stream"):
        return {"files": [("files", (name, data, ctype))]}

    jpeg, png = s["jpeg"], s["png"]
    corrupt_jpeg = jpeg[:200] + bytes(b ^ 0xFF for b in jpeg[200:600]) + jpeg[600:]
    corrupt_png = png[:40] + b"\xde\xad\xbe\xef" * 8 + png[72:]
    gray = np.zeros((64, 64), np.uint8)
    return [
        ("zero bytes", upload("empty.png", b"")),
        ("truncated JPEG", upload("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg")),
        ("corrupt JPEG", upload("c.jpg", corrupt_jpeg, "image/jpeg")),
        ("truncated PNG", upload("t.png", png[: len(png) // 2], "image/png")),
        ("corrupt PNG", upload("c.png", corrupt_png, "image/png")),
        ("20000x20000 PNG bomb", upload("bomb.png", png_bomb(), "image/png")),
        ("renamed PDF", upload("scan.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n" * 50, "image/png")),
        ("malformed DICOM", upload("m.dcm", b"\0" * 128 + b"DICM" + bytes(range(256)) * 4)),
        ("DICOM truncated pixels", upload("t.dcm", dicom(gray, truncate=True))),
        ("DICOM with lying size", upload("l.dcm", dicom(gray, rows=60_000))),
        ("huge multipart body", upload("big.png", b"\0" * (30 * 1024 * 1024))),
        ("chunked body, no length", {"content": (b"\0" * 65536 for _ in range(500)),
                                     "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("too many files", {"files": [("files", ("a.png", png))] * 40}),
        ("broken multipart", {"content": b"--x\r\nContent-Disposition: form-data\r\n\r\n\x00\x01",
                              "headers": {"content-type": "multipart/form-data; boundary=x"}}),
        ("no boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}),
        ("JSON body", {"json": {"image": "aGVsbG8="}}),
        ("wrong field name", {"files": [("image", ("a.png", png))]}),
        ("text/plain body", {"content": b"hello", "headers": {"content-type": "text/plain"}}),
    ]


def mutate(data: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(data)
    op = rng.integers(0, 5)
    if op == 0:  # bit flips
        for i in rng.integers(0, len(b), size=int(rng.integers(1, 50))):
            b[i] ^= 1 << int(rng.integers(0, 8))
    elif op == 1:  # truncation
        b = b[: int(rng.integers(0, len(b)))]
    elif op == 2:  # splice random bytes in
        at = int(rng.integers(0, len(b)))
        b[at:at] = rng.bytes(int(rng.integers(1, 2000)))
    elif op == 3:  # overwrite a header region
        at = int(rng.integers(0, min(len(b), 300)))
        b[at:at + 16] = rng.bytes(16)
    else:  # pure random bytes
        b = bytearray(rng.bytes(int(rng.integers(0, 5000))))
    return bytes(b)


def fuzz_case(s: dict[str, bytes], rng: np.random.Generator) -> dict:
    kind = list(s)[int(rng.integers(0, len(s)))]
    names = ["x.png", "x.jpg", "x.dcm", "", "../../etc/passwd", "\u00e9\u2603.webp", "a" * 300, "x.pdf"]
    ctypes = ["image/png", "image/jpeg", "application/dicom", "application/octet-stream", "text/html", "",
              "image/png; charset=\u2603"]
    n = int(rng.integers(1, 4))
    return {"files": [("files", (names[int(rng.integers(0, len(names)))], mutate(s[kind], rng),
                                 ctypes[int(rng.integers(0, len(ctypes)))])) for _ in range(n)]}


def send(http: httpx.Client, url: str, kwargs: dict) -> int:
    try:
        return http.post(url + "/v1/predict", **kwargs).status_code
    except httpx.HTTPError as exc:  # a refused upload may be cut off mid-stream: count it, it is not a 5xx
        log.info("transport: %s", type(exc).__name__)
        return -1


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fuzz", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the report
    s, rng = seeds(), np.random.default_rng(args.seed)
    report = {"date": time.strftime("%Y-%m-%d"), "corpus": {}, "seed": args.seed}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else fresh_checkpoint(Path(tmp), args.size)
        with serving(model) as url, httpx.Client(timeout=120) as http:
            for name, kwargs in corpus(s):
                report["corpus"][name] = send(http, url, kwargs)
                log.info("%-26s -> %s", name, report["corpus"][name])
            fuzz = Counter(send(http, url, fuzz_case(s, rng)) for _ in range(args.fuzz))
            report["fuzz_status_counts"] = {str(k): v for k, v in sorted(fuzz.items())}
            report["healthy_after"] = http.get(url + "/health").status_code == 200
            ok = http.post(url + "/v1/predict", files=[("files", ("ok.png", s["png"]))])
            report["predicts_after"] = ok.status_code == 200 and ok.json()["results"][0]["status"] in ("ok", "not_xray")
    report["n_5xx"] = sum(1 for c in report["corpus"].values() if c >= 500) + \
        sum(v for k, v in report["fuzz_status_counts"].items() if int(k) >= 500)
    # -1: the connection dropped (no HTTP answer); counted per request, not per distinct status
    report["transport_errors"] = list(report["corpus"].values()).count(-1) + report["fuzz_status_counts"].get("-1", 0)
    report["passed"] = (report["n_5xx"] == 0 and report["transport_errors"] == 0 and report["healthy_after"]
                        and report["predicts_after"])
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
