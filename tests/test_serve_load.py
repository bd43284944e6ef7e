"""benchmarks/serve_load.py: fair request plans, /metrics histogram diffs, summaries, and one tiny live run."""

import sys
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("httpx")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import serve_load  # noqa: E402

from bonefrac.serve.telemetry import Telemetry  # noqa: E402


def test_plans_split_requests_evenly_and_cycle_every_image():
    assert serve_load.split_counts(10, 4) == [3, 3, 2, 2]
    plan = serve_load.make_plan(4, [3, 3, 2, 2], 5)
    assert plan == [[0, 4, 3], [1, 0, 4], [2, 1], [3, 2]]
    # both modes build the same plan from the same counts: same clients, requests and images
    assert serve_load.make_plan(4, [3, 3, 2, 2], 5) == plan
    flat = sorted(i for p in serve_load.make_plan(8, serve_load.split_counts(800, 8), 100) for i in p)
    assert flat == sorted(list(range(100)) * 8)  # every image equally often


def test_batch_histogram_is_the_difference_of_two_metrics_snapshots():
    tel = Telemetry()
    for size in (1, 1, 3):  # e.g. warm-up calls, not part of the measured run
        tel.batch(size)
    before = serve_load.parse_batch_metrics(tel.render())
    for size in (1, 2, 4, 5, 16, 16, 70):
        tel.batch(size)
    diff = serve_load.batch_histogram(before, serve_load.parse_batch_metrics(tel.render()))
    assert diff["model_calls"] == 7 and diff["images"] == 114
    assert diff["mean_batch"] == round(114 / 7, 2)
    assert diff["histogram"] == {"1": 1, "2": 1, "3-4": 1, "5-8": 1, "9-16": 2, ">64": 1}


def test_summary_counts_errors_and_truncation():
    plan = [[0, 1, 2], [3, 4, 5]]
    records = [(0, 0.0, 0.1, 200, False), (0, 0.1, 0.3, 200, False), (0, 0.3, 0.4, 500, False),
               (1, 0.0, 0.2, 200, True), (1, 0.2, 0.5, -1, False)]
    s = serve_load.summarise(records, 0.0, plan)
    assert (s["requests"], s["errors"], s["not_ok_results"]) == (5, 2, 1)
    assert s["per_client"] == [3, 2] and s["truncated"] is True
    assert s["req_s"] == 10.0 and s["p50_ms"] == 200.0 and s["max_ms"] == 300.0
    assert s["status_counts"] == {"200": 3, "500": 1, "-1": 1}


def test_live_run_on_cpu_both_modes_equal_requests(tmp_path):
    """Two real servers (tiny model, CPU), 3 clients in 2 spawned load processes, 9 requests per mode."""
    from test_serve import tiny_checkpoint

    ckpt = tiny_checkpoint(tmp_path / "ckpt")
    images = [p.read_bytes() for p in sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))[:4]]
    out = serve_load.run_benchmark(ckpt, images, [3], requests=9, seconds=60, device="cpu", procs=2, warmup=3,
                                   modes=["batching_off", "batching_on"], max_batch=4, max_wait_ms=20,
                                   log_dir=tmp_path)
    run = out["runs"][0]
    for mode in ("batching_off", "batching_on"):
        r = run[mode]
        assert r["requests"] == 9 and r["errors"] == 0 and not r["truncated"]
        assert r["images"] == 9 and sum(r["histogram"].values()) == r["model_calls"]
    assert run["batching_off"]["histogram"] == {"1": 9}
    assert run["same_requests"] and run["zero_errors"] and run["req_s_ratio"] > 0
    assert "on cpu" in (tmp_path / "server_batching_on.log").read_text()


def test_clients_are_set_up_and_warmed_before_the_clock_starts():
    """The timed window holds only steady-state requests: no HTTP-client set-up, connection or warm-up in it."""
    import socket
    import threading
    import time

    import uvicorn

    from bonefrac.serve.app import create_app
    from bonefrac.serve.settings import Settings
    from bonefrac.serve.synthetic import SyntheticPredictor

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = create_app(Settings(preprocess_workers=0, rate_limit=0), predictor=SyntheticPredictor(1, 3, size=64))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while not server.started and time.monotonic() < deadline:
            time.sleep(0.05)
        images = [p.read_bytes() for p in sorted((ROOT / "data" / "sample" / "images").glob("*.webp"))[:3]]
        plan, warm = serve_load.make_plan(4, [3] * 4, 3), serve_load.make_plan(4, [2] * 4, 3)
        marks = []
        records, start = serve_load.generate(url, images, plan, 60, 1, 30, warm,
                                             on_ready=lambda: marks.append(serve_load.batch_metrics(url)))
        after = serve_load.batch_metrics(url)
    finally:
        server.should_exit = True
        thread.join(10)
    assert len(records) == 12 and all(r[3] == 200 and not r[4] for r in records)
    assert min(t0 for _, t0, *_ in records) >= start
    assert marks[0]["sum"] == 8 and after["sum"] == 8 + 12  # warm-up served, but before the measured window
