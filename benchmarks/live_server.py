"""A `bonefrac serve` process on loopback for the service benchmarks (serve_load.py, serve_robustness.py):
`serving(model, *flags)` starts one on a free port and yields its URL once /ready answers; `fresh_checkpoint`
picks the model to serve."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

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
def serving(model: Path | None, *flags: str, env: dict | None = None, log_file=None, ready_timeout: float = 120):
    """Run `bonefrac serve` (model None: the synthetic stand-in model) on a free loopback port; yields its base
    URL; stops it afterwards."""
    port = free_port()
    app = ["bonefrac", "serve", "--model", str(model)] if model else ["bonefrac.serve.synthetic"]
    cmd = [sys.executable, "-m", *app, "--host", "127.0.0.1", "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env={**os.environ, "BONEFRAC_RATE_LIMIT": "0", **(env or {})},
                            stdout=log_file or subprocess.DEVNULL, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited with {proc.returncode}")
            time.sleep(0.3)
        else:
            raise RuntimeError(f"server did not become ready in {ready_timeout:g} s")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
