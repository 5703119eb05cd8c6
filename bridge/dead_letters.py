"""Events the broker refuses forever, set aside on disk instead of blocking the rest.

A body above the broker's `max_message_size`, or a content header larger than the
connection's `frame_max`, can never be published: retried forever, it would hold every
event behind it. After a bounded number of refusals the publisher hands such an event
here and goes on. Nothing is lost: the body, its routing key, its message id and the
reason are kept in an SQLite file next to the spool, readable with any SQLite tool:

    sqlite3 spool.dead-letters.sqlite3 'SELECT seq, message_id, reason FROM dead_letters'

An event set aside is never published again by this bridge, after a restart included:
once the cause is fixed, `tutum-bridge dead-letters replay` (bridge/tools/
dead_letters.py) publishes it and removes it from here, from another process, while
the bridge runs or not (SQLite locks the file between them).
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.event import Event

_SCHEMA = """
CREATE TABLE IF NOT EXISTS dead_letters (
    seq INTEGER PRIMARY KEY,
    message_id TEXT NOT NULL,
    received_at REAL NOT NULL,
    set_aside_at REAL NOT NULL,
    routing_key TEXT NOT NULL,
    headers TEXT NOT NULL,
    body BLOB NOT NULL,
    reason TEXT NOT NULL
);
"""


def path_beside(spool_path: Path) -> Path:
    return spool_path.with_name(spool_path.stem + ".dead-letters.sqlite3")


@dataclass(frozen=True)
class DeadLetter:
    """One event set aside, as stored."""

    seq: int
    message_id: str
    received_at: float
    set_aside_at: float
    routing_key: str
    headers: dict
    body: bytes
    reason: str


class DeadLetters:
    """Appended to by the publisher's thread; read and emptied by the tool."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self._db.executescript(_SCHEMA)

    def add(self, seq: int, message_id: str, event: Event, reason: str) -> None:
        """Durably record the event; raises sqlite3.Error if the disk will not take it."""
        self._db.execute(
            "INSERT OR REPLACE INTO dead_letters VALUES (?,?,?,?,?,?,?,?)",
            (seq, message_id, event.received_at, time.time(), event.routing_key,
             json.dumps(event.headers, default=str), event.body, reason))

    def seqs_after(self, seq: int) -> set[int]:
        """The sequence numbers set aside above `seq` (those the spool may still hold)."""
        return {row[0] for row in self._db.execute(
            "SELECT seq FROM dead_letters WHERE seq > ?", (seq,))}

    def entries(self) -> list[DeadLetter]:
        """Every event set aside, in the order received."""
        rows = self._db.execute("SELECT seq, message_id, received_at, set_aside_at, "
                                "routing_key, headers, body, reason FROM dead_letters "
                                "ORDER BY seq").fetchall()
        return [DeadLetter(seq, mid, received, set_aside, key, json.loads(headers),
                           bytes(body), reason)
                for seq, mid, received, set_aside, key, headers, body, reason in rows]

    def remove(self, seq: int) -> None:
        """Forget an event, once the broker has confirmed it at last."""
        self._db.execute("DELETE FROM dead_letters WHERE seq = ?", (seq,))

    @property
    def count(self) -> int:
        return self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]

    def close(self) -> None:
        self._db.close()
