"""Start-up validation of the service settings (BONEFRAC_* variables and `bonefrac serve` flags)."""

import logging
import re
from pathlib import Path

import pytest

from bonefrac.errors import ConfigError
from bonefrac.serve import settings as settings_mod
from bonefrac.serve.settings import Settings

SRC = Path(__file__).resolve().parents[1] / "src"


@pytest.mark.parametrize("raw", ["flase", "enabled", "2", "y es"])
def test_boolean_rejects_unknown_words(raw):
    with pytest.raises(ConfigError, match=rf"BONEFRAC_XRAY_CHECK={raw!r}.*true/false"):
        Settings.from_env({"BONEFRAC_XRAY_CHECK": raw})


@pytest.mark.parametrize("raw, want", [("1", True), ("TRUE", True), (" Yes ", True), ("on", True),
                                       ("0", False), ("False", False), ("NO", False), ("Off", False)])
def test_boolean_accepts_the_documented_words(raw, want):
    assert Settings.from_env({"BONEFRAC_WARMUP": raw}).warmup is want
    with pytest.raises(ConfigError, match="BONEFRAC_WARMUP"):  # and nothing else
        Settings.from_env({"BONEFRAC_WARMUP": raw + "x"})


# (variable, rejected value, accepted boundary value)
RANGES = [
    ("PORT", "99999", "65535"), ("PORT", "0", "1"),
    ("MAX_BATCH", "0", "1"),
    ("MAX_WAIT_MS", "nan", "0"), ("MAX_WAIT_MS", "-1", "0"), ("MAX_WAIT_MS", "inf", "250"),
    ("MAX_REQUEST_MB", "-1", "0.5"), ("MAX_REQUEST_MB", "0", "0.5"), ("MAX_REQUEST_MB", "inf", "1e3"),
    ("MAX_FILES", "0", "1"),
    ("MAX_PIXELS", "0", "1"),
    ("RATE_LIMIT", "-5", "0"),  # 0 is the documented "off"
    ("REFER_MARGIN", "-0.5", "0"), ("REFER_MARGIN", "0.5", "0.49"), ("REFER_MARGIN", "nan", "0.15"),
]


@pytest.mark.parametrize("var, bad, good", RANGES)
def test_out_of_range_values_fail_naming_the_variable(var, bad, good):
    with pytest.raises(ConfigError, match=rf"BONEFRAC_{var}=.*expected"):
        Settings.from_env({f"BONEFRAC_{var}": bad})
    s = Settings.from_env({f"BONEFRAC_{var}": good})
    assert getattr(s, var.lower()) == float(good)
    s.max_request_bytes  # finite: no OverflowError


@pytest.mark.parametrize("flag, value", [("port", 99999), ("max_batch", 0), ("max_wait_ms", float("nan"))])
def test_out_of_range_flags_fail_naming_the_flag(flag, value):
    with pytest.raises(ConfigError, match=rf"BONEFRAC_{flag.upper()}=.*\(or --{flag.replace('_', '-')}\)"):
        Settings.from_env({}, **{flag: value})


def test_operating_point_comes_from_the_variable_or_the_flag_and_is_a_name():
    assert Settings.from_env({}).operating_point is None  # the model's own threshold
    assert Settings.from_env({"BONEFRAC_OPERATING_POINT": ""}).operating_point is None  # empty: as if unset
    assert Settings.from_env({"BONEFRAC_OPERATING_POINT": "screening"}).operating_point == "screening"
    flagged = Settings.from_env({"BONEFRAC_OPERATING_POINT": "screening"}, operating_point="high_sensitivity")
    assert flagged.operating_point == "high_sensitivity"
    for bad in ("high sensitivity", " ", "screening;"):  # whether the model has the point is checked at load
        with pytest.raises(ConfigError, match=r"BONEFRAC_OPERATING_POINT=.*\(or --operating-point\): expected "
                                              "the name of an operating point"):
            Settings.from_env({"BONEFRAC_OPERATING_POINT": bad})


def test_empty_api_key_is_an_error():
    with pytest.raises(ConfigError, match="BONEFRAC_API_KEY=.*non-empty"):
        Settings.from_env({"BONEFRAC_API_KEY": ""})
    with pytest.raises(ConfigError, match="BONEFRAC_API_KEY"):
        Settings(api_key="  ")  # blank, however it was given
    assert Settings.from_env({}).api_key is None  # unset: no key, as documented


def test_unknown_variables_are_warned_about(caplog):
    env = {"BONEFRAC_RATELIMIT": "5", "BONEFRAC_MODEL": "m", "BONEFRAC_COPY_DETECTOR": "d", "OTHER_X": "1"}
    with caplog.at_level(logging.WARNING, logger=settings_mod.__name__):
        Settings.from_env(env)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    unknown, known = warnings[0].split("known:")
    assert "BONEFRAC_RATELIMIT" in unknown and "BONEFRAC_RATE_LIMIT" in known
    assert "MODEL" not in unknown and "COPY_DETECTOR" not in unknown and "OTHER_X" not in warnings[0]


def test_known_variables_cover_every_name_the_package_reads(caplog):
    used = set()
    for path in SRC.rglob("*.py"):
        used |= set(re.findall(r"BONEFRAC_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
    assert used and used <= set(settings_mod.known_variables())
    with caplog.at_level(logging.WARNING, logger=settings_mod.__name__):
        Settings.from_env({name: "" for name in used - {"BONEFRAC_API_KEY"}})  # empty: as if unset
    assert not caplog.records


@pytest.mark.parametrize("argv, env", [(["serve", "--port", "99999"], {}),
                                       (["serve"], {"BONEFRAC_MAX_BATCH": "0"}),
                                       (["serve", "--operating-point", "high sensitivity"], {}),
                                       (["serve"], {"BONEFRAC_XRAY_CHECK": "flase"})])
def test_cli_reports_one_line_before_loading_a_model(argv, env, monkeypatch, caplog):
    import bonefrac.serve.app
    from bonefrac.cli import main

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    started = []
    monkeypatch.setattr(bonefrac.serve.app, "run", started.append)  # would load the model
    assert main(argv) == 2 and not started  # ConfigError is a BonefracError: one line, exit 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "\n" not in errors[0] and "BONEFRAC_" in errors[0]


@pytest.mark.parametrize("bad", ["proxy.local", "10.0.0.1/99", "1.2.3"])
def test_trusted_proxies_must_be_addresses(bad):
    with pytest.raises(ConfigError, match="BONEFRAC_TRUSTED_PROXIES=.*IP addresses"):
        Settings.from_env({"BONEFRAC_TRUSTED_PROXIES": f"127.0.0.1,{bad}"})
    assert Settings.from_env({"BONEFRAC_TRUSTED_PROXIES": "10.0.0.0/8, ::1"}).trusted_proxies == ("10.0.0.0/8", "::1")
    assert Settings.from_env({"BONEFRAC_TRUSTED_PROXIES": "*"}).trusted_proxies == ("*",)


def _statuses_behind_proxy(trusted: str) -> list[int]:
    """Six /v1 requests through a real uvicorn server, each naming a different client in X-Forwarded-For."""
    import threading
    import time
    import urllib.error
    import urllib.request

    uvicorn = pytest.importorskip("uvicorn")
    from bonefrac.serve.app import create_app, server_options
    from bonefrac.serve.synthetic import SyntheticPredictor

    settings = Settings(port=_free_port(), rate_limit=1, preprocess_workers=0, warmup=False,
                        trusted_proxies=(trusted,))  # burst 5: the sixth request from one client is refused
    app = create_app(settings, predictor=SyntheticPredictor(1, 2, size=32))
    server = uvicorn.Server(uvicorn.Config(app, **{**server_options(settings), "log_level": "warning"}))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    statuses = []
    try:
        deadline = time.monotonic() + 30
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        for i in range(6):
            req = urllib.request.Request(f"http://127.0.0.1:{settings.port}/v1/audit",
                                         headers={"X-Forwarded-For": f"203.0.113.{i + 1}"})
            try:
                statuses.append(urllib.request.urlopen(req, timeout=10).status)
            except urllib.error.HTTPError as exc:
                statuses.append(exc.code)
    finally:
        server.should_exit = True
        thread.join(10)
    return statuses


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rate_limit_keys_on_the_forwarded_client_only_behind_a_trusted_proxy():
    assert 429 not in _statuses_behind_proxy("127.0.0.1")  # six clients, one request each
    assert _statuses_behind_proxy("10.0.0.1")[-1] == 429  # header ignored: all six are the proxy's


def test_the_documented_request_limit_is_the_default():
    """settings.py's table and README.md's must state the default the code uses."""
    default = f"{Settings().max_request_mb:g}"
    doc = re.search(r"^\| BONEFRAC_MAX_REQUEST_MB \| ([^|]+) \|", settings_mod.__doc__, re.M)
    readme = (SRC.parent / "README.md").read_text()
    row = re.search(r"^\| `BONEFRAC_MAX_REQUEST_MB` \| ([^|]+) \|", readme, re.M)
    assert doc and doc.group(1).strip() == default
    assert row and row.group(1).strip() == default, "README.md's settings table: no or another request limit"
    assert Settings().max_request_mb >= 64


@pytest.mark.parametrize("value, named", [("127.0.0.1,10.0.0.1/8", "did you mean 10.0.0.0/8"),
                                          ("*,10.0.0.0/8", r"\* \(every address\) must stand alone"),
                                          ("10.0.0.0/8,*", "must stand alone")])
def test_trusted_proxies_uvicorn_would_ignore_are_refused(value, named):
    """uvicorn matches no address against 10.0.0.1/8 (host bits set) and ignores * among other entries."""
    with pytest.raises(ConfigError, match=rf"BONEFRAC_TRUSTED_PROXIES={re.escape(value)}: expected .*{named}"):
        Settings.from_env({"BONEFRAC_TRUSTED_PROXIES": value})


@pytest.mark.parametrize("key", ["pässwort-123", "key\x01", "tab\tkey", " padded", "padded ", "ключ"])
def test_api_key_must_be_printable_ascii_and_is_never_echoed(key):
    """A client's header is read as latin-1 and compared as UTF-8: a non-ASCII key could never match."""
    with pytest.raises(ConfigError, match="BONEFRAC_API_KEY=.*printable ASCII") as err:
        Settings.from_env({"BONEFRAC_API_KEY": key})
    assert key.strip() not in str(err.value)
    assert Settings(api_key="Ab1-_.~!#$%&'*+/=?^`|:; spaces inside").api_key.startswith("Ab1")


def test_pixel_budget_queue_limit_and_shutdown_timeout_defaults_and_bounds():
    s = Settings.from_env({"BONEFRAC_MAX_PIXELS": "1000", "BONEFRAC_MAX_BATCH": "4"})
    assert (s.max_pixels_in_flight, s.max_queue, s.shutdown_timeout_s) == (2000, 256, 30)
    s = Settings.from_env({"BONEFRAC_MAX_PIXELS_IN_FLIGHT": "70000000", "BONEFRAC_MAX_QUEUE": "5",
                           "BONEFRAC_SHUTDOWN_TIMEOUT_S": "3"})
    assert (s.max_pixels_in_flight, s.max_queue, s.shutdown_timeout_s) == (70_000_000, 5, 3)
    with pytest.raises(ConfigError, match=r"BONEFRAC_MAX_PIXELS_IN_FLIGHT=999: expected .*>= BONEFRAC_MAX_PIXELS"):
        Settings.from_env({"BONEFRAC_MAX_PIXELS": "1000", "BONEFRAC_MAX_PIXELS_IN_FLIGHT": "999"})
    for name, bad in (("MAX_QUEUE", "0"), ("SHUTDOWN_TIMEOUT_S", "0"), ("MAX_QUEUE", "many")):
        with pytest.raises(ConfigError, match=f"BONEFRAC_{name}="):
            Settings.from_env({f"BONEFRAC_{name}": bad})


def test_the_readme_documents_the_service_limits():
    readme = (SRC.parent / "README.md").read_text()
    for name, default in (("MAX_PIXELS_IN_FLIGHT", "2 x `BONEFRAC_MAX_PIXELS`"),
                          ("MAX_QUEUE", "64 x `BONEFRAC_MAX_BATCH`"), ("SHUTDOWN_TIMEOUT_S", "30")):
        row = re.search(rf"^\| `BONEFRAC_{name}` \| ([^|]+) \|", readme, re.M)
        assert row and row.group(1).strip() == default, name
        assert f"BONEFRAC_{name}" in settings_mod.__doc__


def test_the_readme_names_every_variable_the_package_reads():
    readme = (SRC.parent / "README.md").read_text()
    assert [name for name in settings_mod.known_variables() if not re.search(rf"\b{name}\b", readme)] == []
