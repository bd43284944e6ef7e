"""Service settings: a frozen dataclass read from BONEFRAC_* environment variables (`Settings.from_env()`).

| variable | default | allowed | meaning |
|---|---|---|---|
| BONEFRAC_MODEL | shipped model | | checkpoint dir, ensemble dir, .onnx or TorchScript .pt file (*) |
| BONEFRAC_DEVICE | auto | auto, cpu, cuda[:n], mps | auto: first CUDA GPU when present, else CPU |
| BONEFRAC_OPERATING_POINT | default | a point saved with the model | its validation threshold decides, e.g. screening |
| BONEFRAC_HOST / BONEFRAC_PORT | 127.0.0.1 / 8000 | port 1-65535 | address the service listens on (127.0.0.1: local) |
| BONEFRAC_MAX_BATCH / BONEFRAC_MAX_WAIT_MS | 16 / 10 | >= 1 / finite >= 0 | micro-batching; MAX_BATCH=1 turns it off |
| BONEFRAC_MAX_REQUEST_MB | 64 | finite > 0 | request body cap (an uncompressed DR DICOM is ~30 MB) |
| BONEFRAC_MAX_FILES | 16 | >= 1 | images per request |
| BONEFRAC_MAX_PIXELS | 60000000 | >= 1 | per image, checked from the header before decoding |
| BONEFRAC_MAX_PIXELS_IN_FLIGHT | 2 x MAX_PIXELS | >= MAX_PIXELS | decoded pixels of all uploads, by size (budget.py) |
| BONEFRAC_MAX_QUEUE | 64 x MAX_BATCH | >= 1 | images waiting for the model; beyond it 503 `overloaded` |
| BONEFRAC_SHUTDOWN_TIMEOUT_S | 30 | >= 1 | on shutdown, seconds requests in progress get before they are cancelled |
| BONEFRAC_RATE_LIMIT | 600 | >= 0 | requests per minute per client, bursts of max(5, rate/10) (0: off) |
| BONEFRAC_API_KEY | unset | printable ASCII | when set, /v1/* needs header `X-API-Key` (or `Authorization: Bearer`) |
| BONEFRAC_CORS_ORIGINS | unset (CORS off) | | comma-separated allowed origins |
| BONEFRAC_TRUSTED_PROXIES | 127.0.0.1 | IPs, networks or * alone | proxies whose X-Forwarded-For names the client |
| BONEFRAC_AUDIT_DB | unset (off) | | SQLite file for the audit log |
| BONEFRAC_REFER_MARGIN | 0.15 | 0 <= m < 0.5 | refer when p (rescaled: threshold -> 0.5) is this close to 0.5 |
| BONEFRAC_XRAY_CHECK | 1 | boolean | 0 disables the "not an X-ray" refusal |
| BONEFRAC_PREPROCESS_WORKERS | min(8, CPUs), 0 on <= 2 | >= 0 | upload decode/check/resize processes (0: threads) |
| BONEFRAC_WARMUP | 1 | boolean | on an accelerator, run the model once per batch size 1..MAX_BATCH before ready (**) |

(*) Exported .onnx / TorchScript files are for the service only: `bonefrac predict` and `evaluate` also read
BONEFRAC_MODEL (predict.default_model_path) but need a checkpoint or ensemble directory, and /v1/explain answers
501 for an exported model. (**) Skipped on the CPU whatever the setting (app._warm_up): first calls measured no
slower there.

Booleans take 1/0, true/false, yes/no, on/off (any case). An empty variable counts as unset, except
BONEFRAC_API_KEY, where an empty value is an error (it would silently turn authentication off), as is a key with
characters outside printable ASCII or with spaces at either end (no client could send it as it is). A network in
BONEFRAC_TRUSTED_PROXIES must have no host bits set (10.0.0.0/8, not 10.0.0.1/8), and * stands alone: uvicorn
silently ignores such entries. Every value is
checked here, before any model is loaded; a bad one raises ConfigError naming the variable (and the
`bonefrac serve` flag, where there is one) and the allowed values. Whether the model saved the point that
BONEFRAC_OPERATING_POINT names is checked as the service loads it: if not, it does not start. Unknown BONEFRAC_*
names (typos) are logged as a warning (by every `bonefrac` command, not only serve); names read elsewhere in the
package (BONEFRAC_COPY_DETECTOR, BONEFRAC_FUSED_KERNELS) are known too.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import os
import re
from dataclasses import dataclass, field, fields

from ..errors import ConfigError

log = logging.getLogger(__name__)

_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
# `bonefrac serve --...`
_FLAGS = {"model", "host", "port", "max_batch", "max_wait_ms", "audit_db", "device", "operating_point"}
_POINT_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # every name bonefrac saves; a stray space or quote is a typo
# copydetect.py; predict.py (BONEFRAC_FUSED_KERNELS=0: no fused GPU kernels); BONEFRAC_MODEL is also read by predict.py
_READ_ELSEWHERE = ("BONEFRAC_COPY_DETECTOR", "BONEFRAC_FUSED_KERNELS")


def _default_workers(cpus: int) -> int:
    # Processes pay only with cores to spare: on 2 CPUs (model, server and workers sharing them) the pool
    # measured slower than threads. Capped at 8: each worker holds its own torch and PIL in memory.
    return min(8, cpus) if cpus > 2 else 0


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


# field -> (check, allowed values as shown in the error)
_RANGES = {
    "port": (lambda v: 1 <= v <= 65535, "an integer from 1 to 65535"),
    "max_batch": (lambda v: v >= 1, "an integer >= 1 (1 turns batching off)"),
    "max_wait_ms": (lambda v: _finite(v) and v >= 0, "a finite number >= 0"),
    "max_request_mb": (lambda v: _finite(v) and v > 0, "a finite number > 0"),
    "max_files": (lambda v: v >= 1, "an integer >= 1"),
    "max_pixels": (lambda v: v >= 1, "an integer >= 1"),
    "max_queue": (lambda v: v >= 1, "an integer >= 1 (unset: 64 x BONEFRAC_MAX_BATCH)"),
    "shutdown_timeout_s": (lambda v: v >= 1, "an integer >= 1 (seconds)"),
    "rate_limit": (lambda v: v >= 0, "an integer >= 0 (0 turns rate limiting off)"),
    "refer_margin": (lambda v: _finite(v) and 0 <= v < 0.5, "a number from 0 up to (not including) 0.5"),
    "preprocess_workers": (lambda v: v >= 0, "an integer >= 0 (0: threads)"),
    "device": (lambda v: bool(_DEVICE.fullmatch(v)), "auto, cpu, cuda, cuda:N or mps"),
    # Only the form here: whether the model has the point is known once it loads (create_app checks it then).
    "operating_point": (lambda v: v is None or bool(_POINT_NAME.fullmatch(v)),
                        "the name of an operating point saved with the model, e.g. screening or high_sensitivity"),
    "api_key": (lambda v: v is None or _key_ok(v), "a non-empty key of printable ASCII characters (letters, digits, "
                "punctuation) without spaces at either end, or leave the variable unset"),
}


def _key_ok(key: str) -> bool:
    # The header arrives as latin-1 text and is compared as UTF-8 bytes, so any other character never matches;
    # HTTP strips spaces around header values, so a key with them never matches either.
    return key.strip() == key != "" and all(" " <= c <= "~" for c in key)


def _proxies_problem(entries) -> str | None:
    """Why uvicorn would not honour these entries (it ignores them without a word), or None."""
    if "*" in entries and len(entries) > 1:
        return "* (every address) must stand alone; remove it or the other entries"
    for entry in (e for e in entries if e != "*"):
        try:
            ipaddress.ip_network(entry, strict=True)
        except ValueError:
            try:  # host bits set, e.g. 10.0.0.1/8: uvicorn would match no address against it
                return f"{entry!r} has host bits set; did you mean {ipaddress.ip_network(entry, strict=False)}?"
            except ValueError:
                return f"{entry!r} is not an IP address or network"
    return None


def _problem(field_name: str, shown: str, allowed: str) -> str:
    """`BONEFRAC_PORT=99999 (or --port): expected ...`: the variable, and the `bonefrac serve` flag if any."""
    flag = f" (or --{field_name.replace('_', '-')})" if field_name in _FLAGS else ""
    return f"BONEFRAC_{field_name.upper()}={shown}{flag}: expected {allowed}"


@dataclass(frozen=True)
class Settings:
    model: str | None = None
    device: str = "auto"
    operating_point: str | None = None  # None: the model's own threshold
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int = 16
    max_wait_ms: float = 10.0
    # An uncompressed DR DICOM (4300 x 3500 x 16 bit) is ~30 MB; decompression bombs are MAX_PIXELS's job.
    max_request_mb: float = 64.0
    max_files: int = 16
    max_pixels: int = 60_000_000
    # Unset (None): twice max_pixels. Decoded pixels of all uploads at once (budget.py): a few small compressed
    # uploads can decode to gigabytes.
    max_pixels_in_flight: int | None = field(default=None, metadata={"like": 0})
    max_queue: int | None = field(default=None, metadata={"like": 0})  # unset: 64 x max_batch
    rate_limit: int = 600
    api_key: str | None = field(default=None, repr=False)  # never printed
    cors_origins: tuple[str, ...] = ()
    # The rate limit keys on the client address; behind a reverse proxy on another host every request would come
    # from the proxy, so its X-Forwarded-For is believed for these addresses only (a client could forge it).
    trusted_proxies: tuple[str, ...] = ("127.0.0.1",)
    audit_db: str | None = None
    refer_margin: float = 0.15
    xray_check: bool = True
    preprocess_workers: int = _default_workers(os.cpu_count() or 1)
    warmup: bool = True
    shutdown_timeout_s: int = 30  # uvicorn cancels what is still running after this (a stalled upload, say)

    def __post_init__(self):
        if self.max_pixels_in_flight is None:
            object.__setattr__(self, "max_pixels_in_flight", 2 * self.max_pixels)
        if self.max_queue is None:
            object.__setattr__(self, "max_queue", 64 * self.max_batch)
        for name, (ok, allowed) in _RANGES.items():
            value = getattr(self, name)
            if not ok(value):
                shown = ("''" if value == "" else "(not shown)") if name == "api_key" else repr(value)  # never echoed
                raise ConfigError(_problem(name, shown, allowed))
        self._check_combined()

    def _check_combined(self) -> None:
        problem = _proxies_problem(self.trusted_proxies)
        if problem:
            raise ConfigError(_problem("trusted_proxies", ",".join(self.trusted_proxies),
                                       f"comma-separated IP addresses or networks, or * alone ({problem})"))
        if self.max_pixels_in_flight < self.max_pixels:  # the largest allowed image must fit on its own
            raise ConfigError(_problem("max_pixels_in_flight", repr(self.max_pixels_in_flight),
                                       f"an integer >= BONEFRAC_MAX_PIXELS ({self.max_pixels})"))

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 1024 * 1024)

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "Settings":
        """Settings from BONEFRAC_<FIELD> variables, then `overrides` (CLI flags; None values are ignored)."""
        env = os.environ if environ is None else environ
        warn_unknown_variables(env)
        values = {}
        for f in fields(cls):
            raw = env.get(f"BONEFRAC_{f.name.upper()}")
            if raw is not None and (raw != "" or f.name == "api_key"):
                values[f.name] = _parse(f.name, raw, f.metadata.get("like", f.default))
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)


def known_variables() -> list[str]:
    """Every BONEFRAC_* environment name the package reads."""
    return sorted({f"BONEFRAC_{f.name.upper()}" for f in fields(Settings)} | set(_READ_ELSEWHERE))


def warn_unknown_variables(env) -> None:
    """A warning naming the BONEFRAC_* variables in `env` that nothing reads (typos), with the known ones."""
    known = known_variables()
    unknown = sorted(k for k in env if k.startswith("BONEFRAC_") and k not in known)
    if unknown:
        log.warning("unknown environment variable(s) %s ignored (a typo?); known: %s",
                    ", ".join(unknown), ", ".join(known))


def _parse(name: str, raw: str, default):
    try:
        if isinstance(default, bool):
            return _parse_bool(raw)
        if isinstance(default, int):
            return int(raw)
        if isinstance(default, float):
            return float(raw)
        if isinstance(default, tuple):
            return tuple(s.strip() for s in raw.split(",") if s.strip())
        return raw
    except ValueError:
        kind = "boolean (1/0, true/false, yes/no, on/off)" if isinstance(default, bool) else type(default).__name__
        raise ConfigError(f"BONEFRAC_{name.upper()}={raw!r}: expected a {kind}") from None


def _parse_bool(raw: str) -> bool:
    word = raw.strip().lower()
    if word in _TRUE or word in _FALSE:
        return word in _TRUE
    raise ValueError(raw)
