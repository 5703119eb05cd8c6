"""Unit tests of the simulator's source of frames, which every connection pulls from."""

from __future__ import annotations

import asyncio

from bridge.simulator.source import Frame, Source


def test_frames_pushed_just_before_a_session_waits_are_not_missed():
    """A session found the stream ended and is about to wait; the test pushes frames in
    between (tests/test_resync_example.py, right after the bridge reconnected)."""
    async def scenario() -> list[bytes]:
        source = Source(iter(()))
        assert source.take(10) == []
        source.push([Frame(b"x"), Frame(b"y")])
        await asyncio.wait_for(source.wait_refill(), 2)
        return [frame.payload for frame in source.take(10)]
    assert asyncio.run(scenario()) == [b"x", b"y"]
