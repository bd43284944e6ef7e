"""Optional audit log in SQLite: one row per analysed image (time, model version, image hash, probabilities,
prediction, the threshold that decided it, refer flag), so low-confidence cases can be reviewed. No pixels, file
names or patient fields."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from contextlib import closing, contextmanager
from pathlib import Path

_SCHEMA = """CREATE TABLE IF NOT EXISTS predictions (
    id INTEGER PRIMARY KEY AUTOINCREMENT, time REAL NOT NULL, model_version TEXT NOT NULL,
    image_sha256 TEXT NOT NULL, status TEXT NOT NULL, prediction TEXT, probabilities TEXT, refer INTEGER NOT NULL,
    threshold REAL)"""


class AuditUnavailable(Exception):
    """The audit database could not be written (locked past the timeout, disk full, ...)."""


class AuditLog:
    """Appends rows from any thread (one connection per call, writes serialised by a lock). `timeout`: seconds a
    write waits for a lock held by another process (e.g. someone reading the file) before giving up."""

    def __init__(self, path, timeout: float = 10.0):
        self.path, self.timeout = Path(path), timeout
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            # WAL (kept in the file): readers of the log, such as /v1/audit or an analyst's sqlite3 shell, no
            # longer block the writes each prediction needs.
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(_SCHEMA)
            _add_threshold_column(db)

    @contextmanager
    def _connect(self):
        with closing(sqlite3.connect(self.path, timeout=self.timeout)) as db, db:  # commit, then close
            # Every time, not only at start-up: a log file rotated or removed while the service runs is recreated
            # instead of failing every later prediction with "no such table".
            db.execute(_SCHEMA)
            yield db

    def record(self, model_version: str, results: list[dict], threshold: float | None = None) -> None:
        """One row per result; `threshold`: the decision threshold in use (the operating point's), if any."""
        rows = [(time.time(), model_version, r["sha256"], r["status"], r.get("prediction"),
                 json.dumps(r.get("probabilities")), int(bool(r.get("refer"))), threshold) for r in results]
        try:
            with self._lock, self._connect() as db:
                db.executemany("INSERT INTO predictions (time, model_version, image_sha256, status, prediction, "
                               "probabilities, refer, threshold) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)
        except sqlite3.Error as exc:
            raise AuditUnavailable(f"{type(exc).__name__}: {exc}") from exc  # sqlite's text: no row content

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


def _add_threshold_column(db) -> None:
    # Logs written before the column existed keep their rows (threshold NULL): the model version names the model
    # files, not the operating point a service ran at, so the threshold is recorded beside it.
    if "threshold" not in {row[1] for row in db.execute("PRAGMA table_info(predictions)")}:
        db.execute("ALTER TABLE predictions ADD COLUMN threshold REAL")
