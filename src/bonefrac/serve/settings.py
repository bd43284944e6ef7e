"""Service settings: a frozen dataclass read from BONEFRAC_* environment variables (`Settings.from_env()`).

| variable | default | meaning |
|---|---|---|
| BONEFRAC_MODEL | shipped model | checkpoint dir, .onnx or TorchScript .pt file |
| BONEFRAC_DEVICE | auto | auto (first CUDA GPU when present, else CPU), cpu, cuda[:n], mps |
| BONEFRAC_MAX_BATCH / BONEFRAC_MAX_WAIT_MS | 16 / 10 | micro-batching; MAX_BATCH=1 turns it off |
| BONEFRAC_MAX_REQUEST_MB | 20 | request body cap |
| BONEFRAC_MAX_FILES | 16 | images per request |
| BONEFRAC_MAX_PIXELS | 60000000 | per image, checked from the header before decoding |
| BONEFRAC_RATE_LIMIT | 600 | requests per minute per client (0: off) |
| BONEFRAC_API_KEY | unset | when set, /v1/* needs header `X-API-Key` (or `Authorization: Bearer`) |
| BONEFRAC_CORS_ORIGINS | unset (CORS off) | comma-separated allowed origins |
| BONEFRAC_AUDIT_DB | unset (off) | SQLite file for the audit log |
| BONEFRAC_REFER_MARGIN | 0.15 | refer when the positive probability is this close to the threshold |
| BONEFRAC_XRAY_CHECK | 1 | 0 disables the "not an X-ray" refusal |
| BONEFRAC_PREPROCESS_WORKERS | min(8, CPUs), 0 on <= 2 | processes decoding, checking, resizing uploads (0: threads) |
| BONEFRAC_WARMUP | 1 | run the model once per batch size 1..MAX_BATCH before the service reports ready |
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field, fields

from ..errors import ConfigError

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def _default_workers(cpus: int) -> int:
    # Processes pay only with cores to spare: on 2 CPUs (model, server and workers sharing them) the pool
    # measured slower than threads. Capped at 8: each worker holds its own torch and PIL in memory.
    return min(8, cpus) if cpus > 2 else 0


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    device: str = "auto"
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 10.0
    max_request_mb: float = 20.0
    max_files: int = 16
    max_pixels: int = 60_000_000
    rate_limit: int = 600
    api_key: str | None = field(default=None, repr=False)  # never printed
    cors_origins: tuple[str, ...] = ()
    audit_db: str | None = None
    refer_margin: float = 0.15
    xray_check: bool = True
    preprocess_workers: int = _default_workers(os.cpu_count() or 1)
    warmup: bool = True

    def __post_init__(self):
        if not _DEVICE.fullmatch(self.device):
            raise ConfigError(f"BONEFRAC_DEVICE={self.device!r}: expected auto, cpu, cuda, cuda:N or mps")
        if self.preprocess_workers < 0:
            raise ConfigError(f"BONEFRAC_PREPROCESS_WORKERS={self.preprocess_workers}: expected 0 or more")

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Settings from BONEFRAC_<FIELD> variables, then `overrides` (CLI flags; None values are ignored)."""
        env = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            raw = env.get(f"BONEFRAC_{f.name.upper()}")
            if raw is not None and raw != "":
                values[f.name] = _parse(f.name, raw, f.default)
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def _parse(name: str, raw: str, default):
    try:
        if isinstance(default, bool):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return raw
    except ValueError:
        raise ConfigError(f"BONEFRAC_{name.upper()}={raw!r}: expected a {type(default).__name__}") from None
