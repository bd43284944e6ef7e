"""Robustness run against a live `bonefrac serve`: a corpus of bad inputs, then a seeded fuzz run.

    python benchmarks/serve_robustness.py [--model CKPT] [--fuzz 300] [--seed 0] [--max-request-mb MB] [--json F]

Pass criteria: every corpus request answered with the status and error code it is built to provoke (the
over-size bodies are sized from the server's request cap, which the script hands to the server it starts, so they
reach the size guard: 413 from Content-Length up front, or from the streaming check for a chunked body),
zero 5xx responses, zero dropped connections, and the server still healthy and correct after.
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

from bonefrac.serve.settings import Settings

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


# Expected (status, error code) of each corpus request: the refusal it is built to provoke. Image content the
# decoders cannot read is 422 unreadable_image, a format they do not know 415 unsupported_media_type.
UNREADABLE, UNSUPPORTED, BAD_REQUEST, INVALID = ((422, "unreadable_image"), (415, "unsupported_media_type"),
                                                 (400, "bad_request"), (422, "invalid_request"))
TOO_LARGE = (413, "request_too_large")
MARGIN = 1024 * 1024  # bytes past the cap: well over it, whatever the multipart framing adds or a proxy strips


def corpus(s: dict[str, bytes], settings: Settings) -> list[tuple[str, dict, tuple[int, str]]]:
    """(name, httpx request kwargs, expected (status, code)) of known-bad requests; the over-size ones are sized
    from `settings` (the running server's) so that they exceed its request cap and file count."""
    def upload(name, data, ctype="application/octet-stream"):
        return {"files": [("files", (name, data, ctype))]}

    jpeg, png = s["jpeg"], s["png"]
    corrupt_jpeg = jpeg[:200] + bytes(b ^ 0xFF for b in jpeg[200:600]) + jpeg[600:]
    corrupt_png = png[:40] + b"\xde\xad\xbe\xef" * 8 + png[72:]
    gray = np.zeros((64, 64), np.uint8)
    big = settings.max_request_bytes + MARGIN
    return [
        ("zero bytes", upload("empty.png", b""), UNREADABLE),
        ("truncated JPEG", upload("t.jpg", jpeg[: len(jpeg) // 2], "image/jpeg"), UNREADABLE),
        ("corrupt JPEG", upload("c.jpg", corrupt_jpeg, "image/jpeg"), UNREADABLE),
        ("truncated PNG", upload("t.png", png[: len(png) // 2], "image/png"), UNREADABLE),
        ("corrupt PNG", upload("c.png", corrupt_png, "image/png"), UNSUPPORTED),
        ("20000x20000 PNG bomb", upload("bomb.png", png_bomb(), "image/png"), (413, "image_too_large")),
        ("renamed PDF", upload("scan.png", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n" * 50, "image/png"),
         UNSUPPORTED),
        ("malformed DICOM", upload("m.dcm", b"\0" * 128 + b"DICM" + bytes(range(256)) * 4), UNREADABLE),
        ("DICOM truncated pixels", upload("t.dcm", dicom(gray, truncate=True)), UNREADABLE),
        ("DICOM with lying size", upload("l.dcm", dicom(gray, rows=60_000)), UNREADABLE),
        ("huge multipart body", upload("big.png", b"\0" * big), TOO_LARGE),
        ("chunked body, no length", chunked_upload(big), TOO_LARGE),
        ("too many files", {"files": [("files", ("a.png", png))] * (settings.max_files + 1)},
         (413, "too_many_files")),
        ("broken multipart", {"content": b"--x\r\nContent-Disposition: form-data\r\n\r\n\x00\x01",
                              "headers": {"content-type": "multipart/form-data; boundary=x"}}, BAD_REQUEST),
        ("no boundary", {"content": b"abc", "headers": {"content-type": "multipart/form-data"}}, BAD_REQUEST),
        ("JSON body", {"json": {"image": "aGVsbG8="}}, INVALID),
        ("wrong field name", {"files": [("image", ("a.png", png))]}, INVALID),
        ("text/plain body", {"content": b"hello", "headers": {"content-type": "text/plain"}}, INVALID),
    ]


def chunked_upload(size: int, chunk: int = 65536) -> dict:
    """A well-formed multipart file part of `size` zero bytes sent chunked (no Content-Length), never closed: the
    multipart parser keeps reading, so only the streaming size check can stop it (zeros without a part header were
    refused by the parser as malformed, 400, before the cap was reached)."""
    head = (b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n'
            b"Content-Type: image/png\r\n\r\n")
    return {"content": (head if i == 0 else b"\0" * chunk for i in range(size // chunk + 2)),
            "headers": {"content-type": "multipart/form-data; boundary=x"}}


def mismatches(answers: dict[str, tuple[int, str | None]], expected: dict[str, tuple[int, str]]) -> dict:
    """{name: {"expected": ..., "got": ...}} for each corpus request whose answer is not the one it was built for
    (a missing answer counts as a mismatch)."""
    out = {}
    for name, want in expected.items():
        got = answers.get(name)
        if got is None or tuple(got) != tuple(want):
            out[name] = {"expected": list(want), "got": None if got is None else list(got)}
    return out


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


def answer(http: httpx.Client, url: str, kwargs: dict) -> tuple[int, str | None]:
    """(status, error code of the JSON error body or None) of a POST to /v1/predict; (-1, transport error name)
    when no HTTP answer came."""
    try:
        response = http.post(url + "/v1/predict", **kwargs)
    except httpx.HTTPError as exc:  # a refused upload may be cut off mid-stream: count it, it is not a 5xx
        log.info("transport: %s", type(exc).__name__)
        return -1, type(exc).__name__
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):  # a 200, or a body that is not bonefrac's error JSON
        code = None
    return response.status_code, code


def send(http: httpx.Client, url: str, kwargs: dict) -> int:
    return answer(http, url, kwargs)[0]


def run_corpus(http: httpx.Client, url: str, cases) -> dict[str, tuple[int, str | None]]:
    answers = {}
    for name, kwargs, _ in cases:
        answers[name] = answer(http, url, kwargs)
        log.info("%-26s -> %s %s", name, *answers[name])
    return answers


def verdict(report: dict) -> dict:
    """n_5xx, transport_errors and passed for a report holding corpus, corpus_mismatches, fuzz_status_counts,
    healthy_after and predicts_after."""
    corpus_status = list(report["corpus"].values())
    n_5xx = sum(1 for c in corpus_status if c >= 500) + \
        sum(v for k, v in report["fuzz_status_counts"].items() if int(k) >= 500)
    # -1: the connection dropped (no HTTP answer); counted per request, not per distinct status
    transport = corpus_status.count(-1) + report["fuzz_status_counts"].get("-1", 0)
    passed = (n_5xx == 0 and transport == 0 and not report["corpus_mismatches"] and report["healthy_after"]
              and report["predicts_after"])
    return {"n_5xx": n_5xx, "transport_errors": transport, "passed": passed}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--fuzz", type=int, default=300)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-request-mb", type=float,
                    help="the server's request cap (default: BONEFRAC_MAX_REQUEST_MB, else the service default)")
    ap.add_argument("--json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the report
    settings = Settings.from_env(max_request_mb=args.max_request_mb)
    # The server gets these limits explicitly, so the corpus's over-size requests are sized from what it runs with.
    env = {"BONEFRAC_MAX_REQUEST_MB": str(settings.max_request_mb), "BONEFRAC_MAX_FILES": str(settings.max_files)}
    s, rng = seeds(), np.random.default_rng(args.seed)
    cases = corpus(s, settings)
    report = {"date": time.strftime("%Y-%m-%d"), "seed": args.seed, "max_request_mb": settings.max_request_mb,
              "max_files": settings.max_files}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else fresh_checkpoint(Path(tmp), args.size)
        with serving(model, env=env) as url, httpx.Client(timeout=120) as http:
            answers = run_corpus(http, url, cases)
            fuzz = Counter(send(http, url, fuzz_case(s, rng)) for _ in range(args.fuzz))
            report["fuzz_status_counts"] = {str(k): v for k, v in sorted(fuzz.items())}
            report["healthy_after"] = http.get(url + "/health").status_code == 200
            ok = http.post(url + "/v1/predict", files=[("files", ("ok.png", s["png"]))])
            report["predicts_after"] = ok.status_code == 200 and ok.json()["results"][0]["status"] in ("ok", "not_xray")
    report["corpus"] = {name: status for name, (status, _) in answers.items()}
    report["corpus_codes"] = {name: code for name, (_, code) in answers.items()}
    report["corpus_mismatches"] = mismatches(answers, {name: want for name, _, want in cases})
    for name, problem in report["corpus_mismatches"].items():
        log.error("%s: expected %s, got %s", name, problem["expected"], problem["got"])
    report.update(verdict(report))
    print(json.dumps(report, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
