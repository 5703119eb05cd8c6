"""The benchmark's arithmetic: latency per stretch, the soak's verdicts, the share of the limit.

These are the figures a reader of `bench` acts on (is it leaking? how far from the
limit?), so the verdicts are checked on samples whose answer is known.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import time as clock

import pytest
from prometheus_client import generate_latest

from bridge.bench.cli import _duration
from bridge.bench.consumer import Tally
from bridge.bench.legs import buckets, quantile
from bridge.bench.report import ratios, soak_summary, table
from bridge.bench.shares import CpuShares, broker_pid
from bridge.bench.timeline import (MachineReading, flatness, join, machine_jiffies,
                                   machine_shares, stalled_us)
from bridge.metrics import Metrics


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


def test_the_machine_share_of_a_stretch_comes_from_proc_stat_and_its_pressure_from_psi():
    before = machine_jiffies("cpu  100 0 50 800 10 0 0 40 0 0\ncpu0 1 2 3\n")
    after = machine_jiffies("cpu  160 0 70 900 20 5 5 40 0 0\n")
    assert before == (150, 10, 40, 1000)
    cpu = stalled_us("some avg10=1.00 avg60=0.50 avg300=0.10 total=5000000\n"
                     "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    assert cpu == 5_000_000
    # 10 s apart: 1.5 s of some task waiting for a CPU, none for I/O.
    shares = machine_shares(MachineReading(before, cpu, 700, 100.0),
                            MachineReading(after, cpu + 1_500_000, 700, 110.0))
    assert shares == {"machine_busy": 90 / 200, "machine_iowait": 10 / 200,
                      "machine_steal": 0.0, "machine_cpu_pressure": 0.15,
                      "machine_io_pressure": 0.0}
    # A kernel without PSI: the CPU shares alone.
    assert machine_shares(MachineReading(before, None, None, 100.0),
                          MachineReading(after, None, None, 110.0)) == {
        **shares, "machine_cpu_pressure": None, "machine_io_pressure": None}
    assert machine_shares(None, MachineReading(after, None, None, 110.0)) == dict.fromkeys(shares)


def test_the_soak_summary_names_the_samples_over_the_latency_target():
    samples = [{**sample(1000.0 + 10 * i, 50e6, p99=2.0), "machine_busy": 0.5,
                "machine_iowait": 0.0, "machine_steal": 0.0} for i in range(20)]
    samples[7].update(p99_ms=13.6, machine_busy=0.97, machine_steal=0.21,
                      machine_cpu_pressure=0.34, machine_io_pressure=0.02)
    soak = {"events": 400000, "rate": 2000, "seconds": 200.0, "sample_seconds": 10.0,
            "latency_ms": {"p50": 0.7, "p99": 2.2, "max": 30.0}, "samples": samples,
            "summary": flatness(samples)}
    assert soak_summary(soak)[-1] == ("  p99 over 10 ms in 1 of 20 samples of 10 s: 13.6 ms "
                                      "at 70 s (machine busy 97%, iowait 0%, steal 21%; waiting for "
                                      "a CPU 34%, for I/O 2%)")
    for s in samples:
        s["p99_ms"] = 2.0
    assert soak_summary(soak)[-1] == "  p99 over 10 ms in 0 of 20 samples of 10 s"


def test_a_legs_p99_is_that_of_what_the_bridge_observed_between_two_reads():
    metrics = Metrics()
    receive = metrics.confirm_timer._receive
    receive.observe(0.0005, 1000)                 # before the first read: not counted
    before = buckets(generate_latest(metrics.registry).decode())
    receive.observe(0.0015, 980)                  # between the reads
    receive.observe(0.300, 20)
    after = buckets(generate_latest(metrics.registry).decode())
    name = "tutum_bridge_receive_to_confirm_seconds"
    # Rank 990 of 1,000 lies halfway through the 20 in the (0.25 s, 0.5 s] bucket.
    assert quantile(0.99, before[name], after[name]) == pytest.approx(0.375)
    assert quantile(0.50, before[name], after[name]) == pytest.approx(
        0.001 + 0.0015 * 500 / 980)
    publish = "tutum_bridge_publish_to_confirm_seconds"
    assert quantile(0.99, before[publish], after[publish]) is None     # nothing observed


def test_a_leg_past_the_last_bucket_is_that_bucket_as_in_prometheus():
    before = [(0.5, 0.0), (1.0, 0.0), (float("inf"), 0.0)]
    after = [(0.5, 0.0), (1.0, 1.0), (float("inf"), 100.0)]
    assert quantile(0.99, before, after) == 1.0


def test_the_soak_summary_says_which_leg_held_a_slow_stretch():
    samples = [{**sample(1000.0 + 10 * i, 50e6, p99=2.0), "receive_to_confirm_p99_ms": 1.5,
                "publish_to_confirm_p99_ms": 1.0} for i in range(20)]
    samples[3].update(p99_ms=300.0, receive_to_confirm_p99_ms=240.0,
                      publish_to_confirm_p99_ms=1.2)
    soak = {"events": 400000, "rate": 2000, "seconds": 200.0, "sample_seconds": 10.0,
            "latency_ms": {"p50": 0.7, "p99": 2.2, "max": 300.0}, "samples": samples,
            "summary": flatness(samples)}
    lines = soak_summary(soak)
    assert lines[-2] == ("  p99 over 10 ms in 1 of 20 samples of 10 s: 300.0 ms at 30 s (in "
                         "the bridge: receive to confirm 240.0 ms, publish to confirm 1.2 ms; "
                         "machine CPU unknown)")
    assert lines[-1] == ("  in the bridge, p99 over 10 ms in 20 samples read: receive to "
                         "confirm in 1, publish to confirm in 0")


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


def test_with_rounds_the_share_is_the_median_of_each_rounds_own_share():
    def rounds(*rates: float) -> dict:
        return {"burst": {"events_per_second": sorted(rates)[(len(rates) - 1) // 2],
                          "rounds": [{"events_per_second": r} for r in rates]}}
    # Not the median bridge over the median ceiling (8000 / 10000): each round's own.
    figures = {"real": rounds(8000, 4000, 9000), "stream-ceiling": rounds(40000, 30000, 40000),
               "broker-ceiling": rounds(10000, 8000, 12000)}
    share = ratios(figures)["real/min(ceilings)"]
    assert share["rounds"] == [0.8, 0.5, 0.75] and share["burst"] == 0.75
    text = table(figures)
    assert "(75% of the limit, set by broker-ceiling), the median of 3 rounds: 0.80x 0.50x 0.75x" \
        in text
    assert "burst ev/s by round (the table shows the median): real 8000 4000 9000;" in text


def test_the_pipe_is_a_bridge_to_compare_with_and_has_its_own_share_of_the_limit():
    # The pipe reads and publishes and does nothing else: the real bridge's extra CPU
    # per event is its own work, and the pipe's share is what the machine leaves.
    figures = {"real": burst(8000), "pipe-ceiling": {"burst": {
                   "events_per_second": 9000, "cpu_seconds_per_10k": 0.4}},
               "stream-ceiling": burst(40000), "broker-ceiling": burst(10000)}
    out = ratios(figures)
    assert out["real/pipe-ceiling"]["cpu_per_event"] == 2.5
    assert out["pipe-ceiling/min(ceilings)"] == {"burst": 0.9, "limit": "broker-ceiling"}
    assert out["real/min(ceilings)"]["burst"] == 0.8
    text = table(figures)
    assert "real/pipe-ceiling: burst throughput 0.89x, CPU per event 2.50x" in text
    assert "pipe-ceiling/min(ceilings): burst throughput 0.90x (90% of the limit" in text


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("30m", 1800),
                                           ("1.5h", 5400)])
def test_durations(text, seconds):
    assert _duration(text) == seconds


@pytest.mark.parametrize("text", ["", "m", "-5m", "0", "half an hour"])
def test_bad_durations(text):
    with pytest.raises(argparse.ArgumentTypeError):
        _duration(text)


def test_cpu_shares_count_each_process_and_leave_the_rest_of_the_machine_to_other():
    shares = CpuShares({"bridge": os.getpid(), "standby": None})
    shares.start()
    deadline = clock.thread_time() + 0.05
    while clock.thread_time() < deadline:       # CPU this process spends, to be counted
        pass
    out = shares.stop(10_000)
    cpu = out["cpu_seconds_per_10k"]
    assert "standby" not in cpu                  # a role without a process is not a column
    assert cpu["bridge"] >= 0.05
    assert cpu["other"] >= 0 and out["cores"] >= 1 and out["cores_busy"] > 0


def test_the_broker_is_the_process_listening_on_a_local_urls_port():
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        assert broker_pid(f"amqp://guest:guest@127.0.0.1:{port}/") == os.getpid()
    assert broker_pid("amqp://guest:guest@broker.example:5672/") is None   # not this machine


def test_the_table_says_where_each_bursts_cpu_went():
    machine = {"seconds": 2.0, "cores": 2, "cores_busy": 1.9,
               "cpu_seconds_per_10k": {"bridge": 0.3, "broker": 0.5, "simulator": 0.04,
                                       "consumer": 0.08, "other": 0.01}}
    text = table({"real": {"burst": {"events_per_second": 20_000, "machine": machine},
                           "peak_rss_bytes": 50 * 1024 * 1024}})
    line = next(line for line in text.splitlines() if line.startswith("real ") and "of 2" in line)
    assert line.split() == ["real", "0.30", "-", "0.50", "0.04", "0.08", "0.01", "1.90", "of", "2"]
    assert "where the CPU went" in text
