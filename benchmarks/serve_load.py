"""Service under load on loopback: N concurrent clients against `bonefrac serve`, micro-batching on vs off.

    python benchmarks/serve_load.py [--model CKPT] [--clients 16] [--seconds 20] [--max-requests 2000] [--json F]

Each mode runs a fresh server; clients post one real X-ray per request back to back for a bounded time and
count. Reports requests/s, p50/p99 latency, errors and the mean batch size (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

log = logging.getLogger("bench")
ROOT = Path(__file__).resolve().parents[1]


def fresh_checkpoint(tmp: Path, size: int) -> Path:
    """models/fracatlas_effnet_lite when shipped, else a random tf_efficientnet_lite0 at `size` px."""
    import torch

    from bonefrac import checkpoint
    from bonefrac.models import create

    shipped = ROOT / "models" / "fracatlas_effnet_lite"
    if (shipped / checkpoint.META_FILE).is_file():
        return shipped
    torch.manual_seed(0)
    meta = {"arch": "tf_efficientnet_lite0", "class_names": ["no_fracture", "fracture"], "positive_index": 1,
            "preprocess": {"size": size, "mean": [0.5] * 3, "std": [0.5] * 3, "channels": 3},
            "threshold": 0.5, "temperature": 1.0, "manifest_sha256": "random-init"}
    return checkpoint.save(tmp / "fresh", create("tf_efficientnet_lite0", 2).eval(), meta)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(model: Path, *flags: str, env: dict | None = None, log_file=None):
    """Run `bonefrac serve` on a free loopback port; yields its base URL; stops it afterwards."""
    port = free_port()
    cmd = [sys.executable, "-m", "bonefrac", "serve", "--model", str(model), "--host", "127.0.0.1",
           "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "BONEFRAC_RATE_LIMIT": "0", **(env or {})},
                            stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            time.sleep(0.3)
        else:
            raise RuntimeError("server did not become ready in 120 s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()


async def _client(url: str, image: bytes, stop_at: float, budget: list, out: list) -> None:
    async with httpx.AsyncClient(timeout=60) as http:
        while time.monotonic() < stop_at and budget[0] > 0:
            budget[0] -= 1
            t = time.perf_counter()
            try:
                resp = await http.post(url + "/v1/predict", files=[("files", ("x.webp", image))])
                status = resp.status_code
            except httpx.HTTPError:
                status = -1
            out.append((time.perf_counter() - t, status))


async def load(url: str, image: bytes, clients: int, seconds: float, max_requests: int) -> dict:
    out, budget = [], [max_requests]
    start = time.monotonic()
    await asyncio.gather(*[_client(url, image, start + seconds, budget, out) for _ in range(clients)])
    elapsed = time.monotonic() - start
    lat = np.array([t for t, _ in out]) * 1000
    errors = sum(1 for _, s in out if s != 200)
    return {"requests": len(out), "errors": errors, "seconds": round(elapsed, 1),
            "req_s": round(len(out) / elapsed, 2), "p50_ms": round(float(np.percentile(lat, 50)), 1),
            "p99_ms": round(float(np.percentile(lat, 99)), 1)}


def mean_batch(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    total = float(re.search(r"^bonefrac_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^bonefrac_batch_size_count (\S+)", text, re.M).group(1))
    return round(total / max(count, 1), 2)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model")
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-requests", type=int, default=2000)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--json")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the report
    image = sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))[0].read_bytes()
    modes = {"batching_on": ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)],
             "batching_off": ["--max-batch", "1", "--max-wait-ms", "0"]}
    results = {"clients": args.clients, "date": time.strftime("%Y-%m-%d")}
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(args.model) if args.model else fresh_checkpoint(Path(tmp), args.size)
        results["model"] = str(model)
        for name, flags in modes.items():
            with serving(model, *flags) as url:
                results[name] = asyncio.run(load(url, image, args.clients, args.seconds, args.max_requests))
                results[name]["mean_batch"] = mean_batch(url)
            log.info("%s %s", name, results[name])
    results["req_s_ratio"] = round(results["batching_on"]["req_s"] / results["batching_off"]["req_s"], 2)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
