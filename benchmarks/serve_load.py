"""Service under load on loopback: N concurrent clients against `bonefrac serve`, micro-batching on vs off.

    python benchmarks/serve_load.py [--model CKPT|FILE.onnx | --synthetic GIL_MS,GPU_MS] [--device auto|cpu|cuda]
        [--clients 16[,64,...]] [--requests 2000] [--seconds 20] [--max-batch 16] [--max-wait-ms 10]
        [--client-procs 1] [--preprocess-workers N] [--images DIR] [--warmup N] [--log-dir DIR] [--json F]

Fair comparison: each mode (one at a time = `--max-batch 1 --max-wait-ms 0`, then micro-batching) runs a fresh
server with the same model and device; for every client count both modes get the same clients, the same number
of requests per client and the same images in the same order (client i's j-th request posts image
(i + j * clients) mod n of `--images`). Every run is bounded twice: at most `--requests` requests and at most
`--seconds` (no client starts a request after that). When the first mode stops at the time bound, the second mode
sends exactly the per-client counts the first one completed (its bound is `--seconds` x `--slack`).

Clients are closed loops. Only steady state is timed: every client builds its HTTP client, opens its connection
and sends its share of the warm-up (same concurrency, same processes, not counted) before a common start. (Built
inside the timed window, 16 clients' HTTP clients blocked the generator's event loop for ~2 s on 2 cores, which
landed in every client's first request as a multi-second p99.) The batch-size histogram is the difference of
/metrics at the start and the end of the timed run. Reports per client count and mode: requests, errors (non-200
or transport failure), requests/s, p50/p90/p99/p99.9/max and a latency histogram, the batch-size histogram, and
the ratios on/off of requests/s and p99. `--client-procs` spreads the clients over spawned processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import multiprocessing as mp
import os
import platform
import re
import signal
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

from live_server import ROOT, fresh_checkpoint, serving

log = logging.getLogger("bench")
MODES = {"batching_off": "one at a time (max batch 1, no wait)", "batching_on": "micro-batching"}


# --- load generation ---------------------------------------------------------------------------------------


def make_plan(clients: int, counts: list[int], n_images: int) -> list[list[int]]:
    """Image indices per client: client i's j-th request posts image (i + j * clients) mod n_images."""
    return [[(i + j * clients) % n_images for j in range(counts[i])] for i in range(clients)]


def split_counts(total: int, clients: int) -> list[int]:
    """`total` requests over `clients` as evenly as possible (the first ones get the remainder)."""
    return [total // clients + (1 if i < total % clients else 0) for i in range(clients)]


async def _client(http: httpx.AsyncClient, url: str, images: list[bytes], plan: list[int], deadline: float,
                  cid: int, out: list | None) -> None:
    """Closed loop: the next request starts when the last one ended; one record per request unless warming."""
    for idx in plan:
        if time.monotonic() >= deadline:
            break
        t0 = time.monotonic()
        refused = False
        try:
            resp = await http.post(url + "/v1/predict", files=[("files", (f"{idx}.webp", images[idx]))])
            status = resp.status_code
            refused = status == 200 and b'"status":"ok"' not in resp.content  # e.g. "not an X-ray"
        except httpx.HTTPError:
            status = -1
        if out is not None:
            out.append((cid, t0, time.monotonic(), status, refused))


async def _session(url, images, plans: dict[int, list[int]], warm: dict[int, list[int]], seconds: float,
                   timeout: float, start_at) -> tuple[list, float]:
    """Before the clock: every HTTP client built (each loads a CA bundle: ~0.1 s of CPU blocking this loop),
    connected (GET /health) and warmed; then `await start_at()` (the common start) and the measured plans."""
    clients = {cid: httpx.AsyncClient(timeout=timeout) for cid in plans}
    try:
        await asyncio.gather(*[http.get(url + "/health") for http in clients.values()])
        await asyncio.gather(*[_client(clients[c], url, images, warm.get(c, []), time.monotonic() + min(seconds, 10),
                                       c, None) for c in plans])
        start = await start_at()
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        out: list = []
        await asyncio.gather(*[_client(clients[c], url, images, plan, start + seconds, c, out)
                               for c, plan in plans.items()])
        return out, start
    finally:
        await asyncio.gather(*[http.aclose() for http in clients.values()])


def _proc_main(url, images, plans, warm, seconds, timeout, ready, go, start_value, results) -> None:
    """One load-generator process (spawned): its clients' session; the records go back on `results`."""
    logging.getLogger("httpx").setLevel(logging.WARNING)

    async def start_at() -> float:
        ready.put(os.getpid())
        await asyncio.to_thread(go.wait)
        return start_value.value

    try:
        records, _ = asyncio.run(_session(url, images, plans, warm, seconds, timeout, start_at))
        results.put(("ok", records))
    except BaseException as exc:  # reported to the parent, which fails loudly
        ready.put(None)
        results.put(("error", repr(exc)))


def generate(url: str, images: list[bytes], plan: list[list[int]], seconds: float, procs: int = 1,
             timeout: float = 60.0, warm: list[list[int]] | None = None, on_ready=None) -> tuple[list, float]:
    """Every client's `warm` plan (not recorded), then `on_ready()`, then every client's `plan` from a common
    start, bounded by `seconds`; (records (client, t0, t1, status, refused), start)."""
    on_ready = on_ready or (lambda: None)
    plans, warms = dict(enumerate(plan)), dict(enumerate(warm or []))
    procs = max(1, min(procs, len(plans)))
    if procs == 1:
        async def start_at() -> float:
            on_ready()
            return time.monotonic() + 0.05

        return asyncio.run(_session(url, images, plans, warms, seconds, timeout, start_at))
    ctx = mp.get_context("spawn")  # CLOCK_MONOTONIC is system-wide on Linux: times compare across processes
    ready, results, go, start_value = ctx.Queue(), ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0)
    workers = [ctx.Process(target=_proc_main, daemon=True,
                           args=(url, images, {c: p for c, p in plans.items() if c % procs == k},
                                 {c: p for c, p in warms.items() if c % procs == k}, seconds, timeout, ready, go,
                                 start_value, results)) for k in range(procs)]
    for w in workers:
        w.start()
    try:
        for _ in workers:  # each has built, connected and warmed its clients
            if ready.get(timeout=180) is None:
                break
        on_ready()
        start_value.value = time.monotonic() + 0.2
        go.set()
        records = []
        for _ in workers:
            kind, payload = results.get(timeout=seconds + timeout + 60)
            if kind != "ok":
                raise RuntimeError(f"load-generator process failed: {payload}")
            records += payload
    finally:
        for w in workers:
            w.join(10)
            if w.is_alive():
                w.terminate()
    return records, start_value.value


def summarise(records: list, start: float, plan: list[list[int]]) -> dict:
    """Requests, errors, req/s and latency percentiles of one measured run (all requests, errors included)."""
    done = [0] * len(plan)
    for cid, *_ in records:
        done[cid] += 1
    if not records:
        return {"requests": 0, "errors": 0, "truncated": True, "per_client": done}
    lat = np.array([t1 - t0 for _, t0, t1, _, _ in records]) * 1000
    elapsed = max(t1 for _, _, t1, _, _ in records) - start
    statuses: dict[str, int] = {}
    for *_, status, _ in records:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    pct = {f"p{q}_ms": round(float(np.percentile(lat, q)), 1) for q in (50, 90, 99, 99.9)}
    edges = [0, 50, 100, 200, 500, 1000, 2000, 5000, np.inf]  # the shape of the tail, not only one percentile
    counts = np.histogram(lat, edges)[0]
    hist = {f"<{hi:g}" if np.isfinite(hi) else f">={lo:g}": int(n) for lo, hi, n in zip(edges, edges[1:], counts)}
    return {"requests": len(records), "errors": sum(1 for r in records if r[3] != 200),
            "not_ok_results": sum(1 for r in records if r[4]), "status_counts": statuses,
            "seconds": round(elapsed, 2), "req_s": round(len(records) / elapsed, 2), **pct,
            "max_ms": round(float(lat.max()), 1), "mean_ms": round(float(lat.mean()), 1),
            "latency_ms_histogram": {k: v for k, v in hist.items() if v},
            "truncated": done != [len(p) for p in plan], "per_client": done}


# --- /metrics ----------------------------------------------------------------------------------------------


def batch_metrics(url: str) -> dict:
    """The server's batch-size histogram now (see parse_batch_metrics)."""
    return parse_batch_metrics(httpx.get(url + "/metrics", timeout=30).text)


def parse_batch_metrics(text: str) -> dict:
    """The batch-size histogram of Prometheus text: {"buckets": {le: cumulative count}, "sum": s, "count": n}."""
    buckets = {le: float(v) for le, v in re.findall(r'^bonefrac_batch_size_bucket\{le="([^"]+)"\} (\S+)', text, re.M)}
    total = float(re.search(r"^bonefrac_batch_size_sum (\S+)", text, re.M).group(1))
    count = float(re.search(r"^bonefrac_batch_size_count (\S+)", text, re.M).group(1))
    return {"buckets": buckets, "sum": total, "count": count}


def batch_histogram(before: dict, after: dict) -> dict:
    """Model calls per batch-size range between two /metrics snapshots, and the mean batch size."""
    edges = [le for le in after["buckets"] if le != "+Inf"]
    cum = {le: after["buckets"][le] - before["buckets"].get(le, 0.0) for le in after["buckets"]}
    hist, prev_edge, prev_cum = {}, 0, 0.0
    for le in edges:
        edge = int(float(le))
        label = str(edge) if edge == prev_edge + 1 else f"{prev_edge + 1}-{edge}"
        hist[label] = int(cum[le] - prev_cum)
        prev_edge, prev_cum = edge, cum[le]
    hist[f">{prev_edge}"] = int(cum.get("+Inf", prev_cum) - prev_cum)
    calls = after["count"] - before["count"]
    images = after["sum"] - before["sum"]
    return {"model_calls": int(calls), "images": int(round(images)),
            "mean_batch": round(images / calls, 2) if calls else 0.0,
            "histogram": {k: v for k, v in hist.items() if v}}


# --- driver ------------------------------------------------------------------------------------------------


def mode_flags(mode: str, max_batch: int, max_wait_ms: float) -> list[str]:
    if mode == "batching_off":
        return ["--max-batch", "1", "--max-wait-ms", "0"]
    return ["--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]


def measure(url: str, images: list[bytes], plan: list[list[int]], n_warm: int, bound: float, procs: int,
            timeout: float) -> dict:
    """One measured run after `n_warm` uncounted requests at the same concurrency, by the same clients."""
    warm = make_plan(len(plan), split_counts(n_warm, len(plan)), len(images)) if n_warm else None
    load_before = os.getloadavg()[0]
    # The histogram is /metrics after minus before; taken once the warm-up is done (first measured request).
    marks: list = []
    records, start = generate(url, images, plan, bound, procs, timeout, warm, on_ready=lambda: marks.append(
        batch_metrics(url)))
    res = summarise(records, start, plan)
    res.update(batch_histogram(marks[0], batch_metrics(url)), loadavg_1m_before=round(load_before, 2),
               loadavg_1m_after=round(os.getloadavg()[0], 2))
    return res


def run_benchmark(model: Path | None, images: list[bytes], clients: list[int], requests: int, seconds: float,
                  modes: list[str], max_batch: int = 16, max_wait_ms: float = 10.0, device: str | None = None,
                  procs: int = 1, warmup: int | None = None, log_dir: Path | None = None,
                  ready_timeout: float = 120, timeout: float = 60.0, slack: float = 1.5, progress=None,
                  server_env: dict | None = None, synthetic: str | None = None) -> dict:
    """Both modes at every client count; the second mode sends the per-client counts the first completed.
    `progress(partial)` is called after every measured run (e.g. to save results in case of a kill).
    `synthetic` ("GIL_MS,GPU_MS") serves the stand-in model of bonefrac.serve.synthetic instead of `model`."""
    runs = {c: {"clients": c} for c in clients}
    counts = {c: split_counts(max(requests, c), c) for c in clients}
    extra = ["--device", device] if device else []
    if synthetic:
        gil_ms, gpu_ms = synthetic.split(",")
        extra += ["--gil-ms", gil_ms, "--gpu-ms", gpu_ms]
    for k, mode in enumerate(modes):
        bound = seconds if k == 0 else seconds * slack
        log_file = open(log_dir / f"server_{mode}.log", "w") if log_dir else None  # noqa: SIM115
        try:
            t_start = time.monotonic()
            with serving(model, *mode_flags(mode, max_batch, max_wait_ms), *extra, env=server_env,
                         log_file=log_file, ready_timeout=ready_timeout) as url:
                startup = round(time.monotonic() - t_start, 1)
                for c in clients:
                    n_warm = warmup if warmup is not None else 2 * c
                    res = measure(url, images, make_plan(c, counts[c], len(images)), n_warm, bound, procs, timeout)
                    res.update(server_startup_s=startup, seconds_bound=bound)
                    counts[c] = res.pop("per_client")  # the next mode sends exactly what this one completed
                    runs[c][mode] = res
                    log.info("%d clients, %s: %s", c, mode, {k: v for k, v in res.items() if k != "status_counts"})
                    if progress:
                        progress({"runs": list(runs.values()), "complete": False})
        finally:
            if log_file:
                log_file.close()
    for run in runs.values():
        on, off = run.get("batching_on"), run.get("batching_off")
        if on and off and off.get("req_s") and on.get("req_s"):
            run["req_s_ratio"] = round(on["req_s"] / off["req_s"], 2)
            run["p99_ratio"] = round(on["p99_ms"] / off["p99_ms"], 2)
            run["same_requests"] = on["requests"] == off["requests"]
            run["zero_errors"] = on["errors"] == 0 and off["errors"] == 0
            run["goal_3x_at_equal_or_lower_p99"] = bool(run["req_s_ratio"] >= 3 and on["p99_ms"] <= off["p99_ms"]
                                                        and run["zero_errors"] and run["same_requests"])
    return {"runs": list(runs.values()), "complete": True}


def _int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("expected positive integers, comma-separated")
    return values


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="checkpoint dir, .onnx or .pt; default: the shipped model (else a random one)")
    ap.add_argument("--synthetic", metavar="GIL_MS,GPU_MS", help="serve the stand-in model of bonefrac.serve.synthetic")
    ap.add_argument("--size", type=int, default=384, help="input size of the random model when none is shipped")
    ap.add_argument("--device", help="server device: auto, cpu, cuda[:n] (default: BONEFRAC_DEVICE or auto)")
    ap.add_argument("--preprocess-workers", type=int, help="server's BONEFRAC_PREPROCESS_WORKERS (0: threads)")
    ap.add_argument("--clients", type=_int_list, default=[16], help="concurrent clients; a list runs each")
    ap.add_argument("--requests", "--max-requests", dest="requests", type=int, default=2000,
                    help="requests per mode and client count (upper bound, equal in both modes)")
    ap.add_argument("--seconds", type=float, default=20, help="time bound per measured run (first mode)")
    ap.add_argument("--slack", type=float, default=1.5, help="time bound of the later modes: seconds x slack")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=10)
    ap.add_argument("--modes", default="batching_off,batching_on", help="order; the first sets the request counts")
    ap.add_argument("--client-procs", type=int, default=1, help="load-generator processes (spawned)")
    ap.add_argument("--warmup", type=int, help="warm-up requests per server and client count (default 2 x clients)")
    ap.add_argument("--images", default=str(ROOT / "data" / "sample" / "images"), help="images posted in turn")
    ap.add_argument("--n-images", type=int, help="use only the first N images (sorted)")
    ap.add_argument("--timeout", type=float, default=60, help="per-request client timeout, s")
    ap.add_argument("--ready-timeout", type=float, default=180, help="server start-up bound, s")
    ap.add_argument("--log-dir", help="write each server's output to DIR/server_<mode>.log")
    ap.add_argument("--json")
    return ap


def main(argv=None) -> dict:
    ap = _parser()
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout` / kill: still stop the server (finally)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request drowns the report
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes or set(modes) - set(MODES):
        ap.error(f"--modes: choose from {', '.join(MODES)}")
    paths = sorted(p for p in Path(args.images).iterdir() if p.suffix.lower() in (".webp", ".png", ".jpg", ".jpeg"))
    paths = paths[:args.n_images] if args.n_images else paths
    if not paths:
        ap.error(f"--images {args.images}: no .webp/.png/.jpg files")
    images = [p.read_bytes() for p in paths]
    log_dir = Path(args.log_dir) if args.log_dir else None
    if log_dir:
        log_dir.mkdir(parents=True, exist_ok=True)
    env = {} if args.preprocess_workers is None else {"BONEFRAC_PREPROCESS_WORKERS": str(args.preprocess_workers)}
    results = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "host": platform.node(), "cpus": os.cpu_count(),
               "python": platform.python_version(), "device": args.device or "server default",
               "max_batch": args.max_batch, "max_wait_ms": args.max_wait_ms, "requests_bound": args.requests,
               "seconds_bound": args.seconds, "slack": args.slack, "client_procs": args.client_procs, "modes": modes,
               "preprocess_workers": args.preprocess_workers if env else "server default",
               "images": {"folder": str(args.images), "count": len(images),
                          "mean_bytes": int(np.mean([len(b) for b in images]))}}

    def save(partial: dict) -> None:
        if args.json:
            Path(args.json).write_text(json.dumps({**results, **partial}, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        model = None if args.synthetic else Path(args.model) if args.model else fresh_checkpoint(Path(tmp), args.size)
        results["model"] = f"synthetic {args.synthetic}" if args.synthetic else str(model)
        results.update(run_benchmark(model, images, args.clients, args.requests, args.seconds, modes,
                                     args.max_batch, args.max_wait_ms, args.device, args.client_procs,
                                     args.warmup, log_dir, args.ready_timeout, args.timeout, args.slack, save,
                                     env, args.synthetic))
    return _report(results, args.json)


def _report(results: dict, json_path: str | None) -> dict:
    if len(results["runs"]) == 1:  # the single-client-count layout of earlier runs, kept for readers of it
        results.update({k: v for k, v in results["runs"][0].items() if k != "clients"},
                       clients=results["runs"][0]["clients"])
    print(json.dumps(results, indent=2))
    for run in results["runs"]:
        print(_table_row(run), flush=True)
    if json_path:
        Path(json_path).write_text(json.dumps(results, indent=2))
    return results


def _table_row(run: dict) -> str:
    parts = [f"clients={run['clients']}"]
    for mode in MODES:
        r = run.get(mode)
        if r and r.get("requests"):
            parts.append(f"{mode}: {r['requests']} req, {r['errors']} err, {r['req_s']} req/s, "
                         f"p50 {r['p50_ms']} ms, p99 {r['p99_ms']} ms, mean batch {r['mean_batch']}")
    if "req_s_ratio" in run:
        parts.append(f"ratio {run['req_s_ratio']}x (p99 on/off {run['p99_ratio']})")
    return " | ".join(parts)


if __name__ == "__main__":
    main()
