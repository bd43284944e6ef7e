"""Optional audit log in SQLite: one row per analysed image (time, model version, image hash, probabilities,
prediction, the threshold that decided it, refer flag, and the route that answered: "predict" or "explain"; the
web page asks both for one upload), so low-confidence cases can be reviewed. No pixels, file names or patient
fields.

From the event loop use `await log.write(...)` and `await log.read(...)`: they run on the log's own thread, never
the default thread pool that decodes uploads, so a log locked by another process stalls only audit work. Each
write gives up `timeout` seconds after it was asked for, however long it queued: writes waiting behind a stalled
one fail together instead of one timeout after another. `close()` (at app shutdown) ends the thread; the next
call starts a new one.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from functools import partial
from pathlib import Path

_SCHEMA = """CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model_version TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, status TEXT NOT NULL, prediction TEXT, probabilities TEXT, refer INTEGER NOT NULL,
    threshold REAL, route TEXT)"""


class AuditUnavailable(Exception):
    """The audit database could not be written (locked past the timeout, disk full, ...)."""


class AuditLog:
    """Appends rows from any thread (one connection per call, writes serialised by a lock). `timeout`: seconds a
    write waits in all (its turn, this process's lock, the database lock another process may hold) before it
    gives up with AuditUnavailable."""

    def __init__(self, path, timeout: float = 10.0):
        self.path, self.timeout = Path(path), timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._executor: ThreadPoolExecutor | None = None
        with self._connect() as db:
            # WAL (kept in the file): readers of the log, such as /v1/audit or an analyst's sqlite3 shell, no
            # longer block the writes each prediction needs. Here for a log made before WAL was used.
            db.execute("PRAGMA journal_mode=WAL")
            _add_missing_columns(db)

    @contextmanager
    def _connect(self, timeout: float | None = None):
        timeout = self.timeout if timeout is None else timeout
        with closing(sqlite3.connect(self.path, timeout=timeout)) as db, db:  # commit, then close
            # Every time, not only at start-up: a log file rotated or removed while the service runs is recreated
            # instead of failing every later prediction with "no such table", and in WAL mode (kept in the file),
            # else readers would block writes again.
            if db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'predictions'").fetchone() \
                    is None:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute(_SCHEMA)
            yield db

    async def write(self, model_version: str, results: list[dict], threshold: float | None = None,
                    route: str | None = None) -> None:
        """`record` on the log's own thread, giving up `timeout` seconds from now (AuditUnavailable)."""
        deadline = time.monotonic() + self.timeout
        await self._run(partial(self.record, model_version, results, threshold, deadline=deadline, route=route))

    async def read(self, limit: int = 100, refer_only: bool = False) -> list[dict]:
        """`recent` on the log's own thread."""
        return await self._run(partial(self.recent, limit, refer_only))

    async def _run(self, call):
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="bonefrac-audit")
        return await asyncio.get_running_loop().run_in_executor(self._executor, call)

    def close(self) -> None:
        """End the log's thread once the writes queued finish (each within its timeout)."""
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False)

    def record(self, model_version: str, results: list[dict], threshold: float | None = None,
               deadline: float | None = None, route: str | None = None) -> None:
        """One row per result; `threshold`: the decision threshold in use (the operating point's), if any; `route`:
        what answered ("predict", "explain").
        AuditUnavailable when not written by `deadline` (time.monotonic(); default: `timeout` from now), waits
        for other writes of this process and for the database lock included."""
        deadline = time.monotonic() + self.timeout if deadline is None else deadline
        rows = [(time.time(), model_version, r["sha256"], r["status"], r.get("prediction"),
                 json.dumps(r.get("probabilities")), int(bool(r.get("refer"))), threshold, route) for r in results]
        if not self._lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            raise AuditUnavailable(f"timed out after {self.timeout:g} s waiting for earlier audit writes")
        try:
            # A deadline already passed still writes when nothing holds the database (timeout 0: no waiting).
            with self._connect(max(0.0, deadline - time.monotonic())) as db:
                db.executemany("INSERT INTO predictions (time, model_version, image_sha256, status, prediction, "
                               "probabilities, refer, threshold, route) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"{type(exc).__name__}: {exc}") from exc  # sqlite's text: no row content
        finally:
            self._lock.release()

    def recent(self, limit: int = 100, refer_only: bool = False) -> list[dict]:
        """The latest `limit` rows, newest first (AuditUnavailable when the database cannot be read)."""
        query = "SELECT * FROM predictions" + (" WHERE refer = 1" if refer_only else "")
        try:
            with self._connect() as db:
                db.row_factory = sqlite3.Row
                rows = db.execute(query + " ORDER BY id DESC LIMIT ?", (int(limit),)).fetchall()
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"{type(exc).__name__}: {exc}") from exc
        return [{**dict(r), "probabilities": json.loads(r["probabilities"] or "null"), "refer": bool(r["refer"])}
                for r in rows]


def _add_missing_columns(db) -> None:
    # Logs written before a column existed keep their rows (NULL there): the model version names the model files,
    # not the operating point a service ran at, so the threshold is recorded beside it; the route tells a
    # predict row from the explain row the web page's second request adds for the same upload.
    have = {row[1] for row in db.execute("PRAGMA table_info(predictions)")}
    for column, kind in (("threshold", "REAL"), ("route", "TEXT")):
        if column not in have:
            db.execute(f"ALTER TABLE predictions ADD COLUMN {column} {kind}")
