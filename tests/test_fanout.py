"""`simulate --fanout` (docs/contract.md section 6): several clients of one account.

Events happen in real time; every connected client gets its own copy of each one
(byte for byte, the same `sim_seq`), and a client gets nothing of what happened while
it was away. The HA tests (tests/test_ha.py) rely on exactly this.
"""

from __future__ import annotations

import json

import websocket

from tests.support.procs import simulator_stats
from tests.support.stream_client import events_url
from tests.support.wait import wait_for


def _open(sim) -> websocket.WebSocket:
    ws = websocket.create_connection(events_url(sim), timeout=10)
    for _ in range(2):                      # auth, user-notifications
        ws.recv()
    return ws


def _events(ws: websocket.WebSocket, n: int) -> list[tuple[int, str]]:
    out = []
    while len(out) < n:
        text = ws.recv()
        out.append((json.loads(text)["sim_seq"], text))
    return out


def _contiguous(seqs: list[int]) -> bool:
    return seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_every_connected_client_gets_every_event_and_none_from_while_away(simulator):
    sim = simulator("--fanout", "--sequence", "--rate", "400", "--count", "1000")
    a = _open(sim)
    first_a = _events(a, 100)
    b = _open(sim)
    got_b_start = _events(b, 50)
    more_a = _events(a, 100)
    a.close()
    left_at = first_a[0][0] + 199
    # Away while at least 100 events happen.
    wait_for(lambda: simulator_stats(sim)["last_seq"] > left_at + 100, 20, 0.05,
             what="events to happen while the client is away")
    a2 = _open(sim)
    got_a2 = _events(a2, 50)
    rest_b = _events(b, 1000 - got_b_start[-1][0])     # up to the last event, 1000

    seqs_a = [s for s, _ in first_a + more_a]
    seqs_b = [s for s, _ in got_b_start + rest_b]
    assert seqs_a[0] == 1 and _contiguous(seqs_a)
    assert seqs_b[0] > 100, "B got events that happened before it connected"
    assert _contiguous(seqs_b) and seqs_b[-1] == 1000
    assert got_a2[0][0] > left_at + 100, "A got events that happened while it was away"
    assert _contiguous([s for s, _ in got_a2])
    # One copy of each event: the same bytes on both connections.
    by_seq_b = dict(got_b_start + rest_b)
    for seq, text in first_a + more_a + got_a2:
        if seq in by_seq_b:
            assert by_seq_b[seq] == text

    stats = simulator_stats(sim)
    assert stats["last_seq"] == 1000
    # Nobody was connected for none of them, so every event went to someone.
    assert stats["sent"] == 1000
    conns = stats["per_connection"]
    assert conns["2"]["first_seq"] == seqs_b[0] and conns["2"]["last_seq"] == 1000
    assert conns["1"]["open"] is False and conns["1"]["first_seq"] == 1
    assert conns["3"]["first_seq"] == got_a2[0][0]
    b.close()
    a2.close()
