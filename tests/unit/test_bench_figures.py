"""The benchmark's arithmetic: latency per stretch, the soak's verdicts, the share of the limit.

These are the figures a reader of `bench` acts on (is it leaking? how far from the
limit?), so the verdicts are checked on samples whose answer is known.
"""

from __future__ import annotations

import argparse
import json

import pytest

from bridge.bench.cli import _duration
from bridge.bench.consumer import Tally
from bridge.bench.report import ratios, table
from bridge.bench.timeline import flatness, join


def event(seq: int, sent: float) -> bytes:
    return json.dumps({"type": "container", "sim_seq": seq, "sim_sent_at": sent}).encode()


def test_latency_is_bucketed_by_the_wall_clock_stretch_it_was_delivered_in():
    tally = Tally(4, bucket_seconds=10)
    tally.add(event(1, 100.0), 100.001)
    tally.add(event(2, 105.0), 105.003)
    tally.add(event(2, 105.0), 105.004)           # a duplicate counts once
    tally.add(event(3, 110.0), 110.010)
    buckets = tally.results()["buckets"]
    assert [b["t"] for b in buckets] == [100, 110]
    assert [b["events"] for b in buckets] == [2, 1]
    assert buckets[0]["max"] == pytest.approx(3.0) and buckets[1]["p99"] == pytest.approx(10.0)


def sample(t: float, rss: float, p99: float = 2.0) -> dict:
    return {"t": t, "rss_bytes": rss, "cpu_seconds_per_10k": 0.5, "p99_ms": p99,
            "spool_bytes": 4096, "written_bytes_per_event": 900}


def test_a_steady_run_is_flat_and_a_growing_one_is_not():
    steady = [sample(t, 50e6 + (t % 3) * 1e5) for t in range(100)]
    growing = [sample(t, 50e6 * (1 + t / 100)) for t in range(100)]
    assert all(f["flat"] for f in flatness(steady).values())
    verdict = flatness(growing)
    assert not verdict["rss_bytes"]["flat"] and verdict["rss_bytes"]["change"] > 0.5
    assert verdict["cpu_seconds_per_10k"]["flat"]


def test_the_worst_p99_is_reported_even_when_the_tenths_agree():
    samples = [sample(t, 50e6, p99=40.0 if t == 50 else 2.0) for t in range(100)]
    verdict = flatness(samples)["p99_ms"]
    assert verdict["flat"] and verdict["max"] == 40.0


def test_samples_join_the_consumer_buckets_of_the_same_stretch():
    joined = join([{"t": 100.0}, {"t": 110.0}], [{"t": 110.0, "p50": 1, "p99": 2, "max": 3}])
    assert joined[0]["p99_ms"] is None
    assert (joined[1]["p50_ms"], joined[1]["p99_ms"], joined[1]["max_ms"]) == (1, 2, 3)


def burst(rate: float) -> dict:
    return {"burst": {"events_per_second": rate, "cpu_seconds_per_10k": 1.0}}


def test_the_share_of_the_limit_is_taken_against_the_lower_ceiling():
    figures = {"real": burst(8000), "naive-fire": burst(2000),
               "stream-ceiling": burst(40000), "broker-ceiling": burst(10000)}
    share = ratios(figures)["real/min(ceilings)"]
    assert share == {"burst": 0.8, "limit": "broker-ceiling"}
    assert "real/stream-ceiling" not in ratios(figures)
    assert "(80% of the limit, set by broker-ceiling)" in table(figures)


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800),
                                           ("1.5h", 5400)])
def test_durations(text, seconds):
    assert _duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "0", "half an hour"])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _duration(text)
