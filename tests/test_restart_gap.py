"""A restart of the bridge is a gap in the stream, and workers are told so.

The Stream API cannot replay what was sent while no bridge was reading, so the first
`bridge.connected` after a restart on the same spool carries the gap, from the last
frame the previous run received to the new authentication.
"""

from __future__ import annotations

import json

from tests.support.broker import drain


def connected_events(queue: str, count: int) -> list[dict]:
    return [json.loads(m.body) for m in drain(queue, count=count, timeout=30)]


def test_restart_on_the_same_spool_reports_the_gap(simulator, bridge, topology):
    queue = topology.bind("bridge.connected")
    sim = simulator("--seed", "5", "--rate", "50")

    first = bridge(sim, name="bridge-1")
    [before] = connected_events(queue, 1)
    assert before["gap"] is None
    assert first.stop() == 0

    bridge(sim, name="bridge-2")            # same tmp_path, so the same spool file
    [after] = connected_events(queue, 1)
    gap = after["gap"]
    assert gap is not None, after
    assert before["connected_at"] <= gap["lost_at"] < gap["reconnected_at"]
    assert gap["reconnected_at"] == after["connected_at"]
    assert gap["seconds"] >= 0
