"""`tutum-bridge bench` end to end: a tiny run of every bridge, ceiling and mode, and a
clean Ctrl-C.

The figures themselves depend on the machine; what a user relies on is that the run
completes, reports every bridge and ceiling (and the HA pair), the share of the limit,
the soak's samples and verdicts and the plot, and leaves nothing behind on the broker
or in the process table.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import pika
import psutil
import pytest

from tests.support.broker import connect
from tests.support.wait import wait_for

TINY = ["--burst-rounds", "2", "--events", "2000", "--rate", "200", "--latency-seconds", "3", "--idle-seconds", "2"]


def bench(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bridge", "bench", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def exists_on_broker(kind: str, name: str) -> bool:
    with connect() as conn:
        ch = conn.channel()
        try:
            if kind == "queue":
                ch.queue_declare(name, passive=True)
            else:
                ch.exchange_declare(name, passive=True)
        except pika.exceptions.ChannelClosedByBroker as exc:
            if exc.reply_code == 404:
                return False
            raise
        return True


def assert_nothing_left(names: dict[str, str]) -> None:
    for key, name in names.items():
        kind = "queue" if key in ("queue", "quarantine") else "exchange"
        assert not exists_on_broker(kind, name), f"{kind} {name} left on the broker"
    assert not exists_on_broker("queue", names["unrouted"])


SOAK = ["--soak", "5s", "--soak-rate", "200", "--sample-seconds", "1"]
BRIDGES = {"real", "naive-confirm", "naive-fire", "real-ha"}
CEILINGS = {"stream-ceiling", "broker-ceiling"}
LIMITS = CEILINGS | {"pipe-ceiling"}      # rows measured in bursts only


@pytest.mark.slow
def test_tiny_run_measures_every_bridge_and_leaves_nothing_behind(tmp_path):
    out, png = tmp_path / "bench.json", tmp_path / "bench.png"
    proc = bench(*TINY, *SOAK, "--ha", "--json", str(out), "--plot", str(png))
    stdout, stderr = proc.communicate(timeout=150)
    assert proc.returncode == 0, stderr[-3000:]

    report = json.loads(out.read_text())
    assert set(report["bridges"]) == BRIDGES | LIMITS
    for name, figures in report["bridges"].items():
        assert figures["burst"]["events"] == 2000
        assert figures["burst"]["events_per_second"] > 0, name
        assert figures["burst"]["cpu_seconds_per_10k"] > 0, name
        assert figures["peak_rss_bytes"] > 1024 * 1024, name
        assert name in stdout  # a row of the table
        if name != "stream-ceiling":    # over before it can be measured from outside
            shares = figures["burst"]["machine"]["cpu_seconds_per_10k"]
            assert shares["bridge"] > 0 and shares["simulator"] >= 0, name
            assert shares["consumer"] > 0 and shares["other"] >= 0, name
            # The broker on this machine is seen as root (as in CI), else it is in other.
            if "broker" in shares:
                assert shares["broker"] > 0, name
            else:
                assert os.geteuid() != 0, name
        if name in LIMITS:
            continue
        assert figures["latency"]["events"] == 600
        latency = figures["latency"]["latency_ms"]
        assert 0 < latency["p50"] <= latency["p99"] <= latency["max"], name
        assert figures["latency"]["samples"], name   # what the plot draws
    assert set(report["ratios"]) == {"real/naive-confirm", "real/naive-fire", "real/pipe-ceiling",
                                     "real/min(ceilings)", "pipe-ceiling/min(ceilings)",
                                     "real-ha/real"}
    assert report["bridges"]["pipe-ceiling"]["burst"]["duplicates"] == 0
    share = report["ratios"]["real/min(ceilings)"]
    assert share["limit"] in CEILINGS and share["burst"] > 0
    assert "of the limit, set by" in stdout and len(share["rounds"]) == 2
    assert "where the CPU went" in stdout
    assert all(len(f["burst"]["rounds"]) == 2 for f in report["bridges"].values())
    ha = report["bridges"]["real-ha"]["burst"]
    assert ha["duplicates"] == 0                # one leader publishes each event once
    assert ha["standby"]["cpu_seconds_per_10k"] > 0   # the witness read the burst too
    assert report["ratios"]["real-ha/real"]["burst"] > 0
    steady = report["bridges"]["real-ha"]["latency"]
    assert steady["cpu_seconds_per_10k"] > 0 and steady["standby"]["cpu_seconds_per_10k"] >= 0

    soak = report["bridges"]["real"]["soak"]
    assert soak["events"] == 1000 and soak["duplicates"] == 0
    assert len(soak["samples"]) >= 2
    for sample in soak["samples"]:
        assert sample["rss_bytes"] > 1024 * 1024 and sample["spool_bytes"] > 0
        assert sample["p99_ms"] > 0 and sample["cpu_seconds"] >= 0
        assert 0 < sample["machine_busy"] <= 1 and 0 <= sample["machine_steal"] <= 1
        for pressure in ("machine_cpu_pressure", "machine_io_pressure"):   # None: no PSI
            assert sample[pressure] is None or 0 <= sample[pressure] <= 1
    # The bridge's own legs, from its /metrics: the events it confirmed in the stretch.
    legs = [s["receive_to_confirm_p99_ms"] for s in soak["samples"][1:]]
    assert legs and all(v is not None and v > 0 for v in legs)
    for figure in ("rss_bytes", "cpu_seconds_per_10k", "p99_ms", "spool_bytes"):
        assert isinstance(soak["summary"][figure]["flat"], bool)
    assert "real soak: 1000 events at 200/s" in stdout and "p99 over 10 ms in " in stdout

    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert_nothing_left(report["broker"])


def test_ctrl_c_stops_everything_and_exits_130():
    proc = bench(*TINY, "--bridges", "naive-fire", "--events", "1000000")
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stderr.readline, "")))
    reader.start()
    try:
        wait_for(lambda: any("delivered" in line for line in lines), 60,
                 what="the burst to start")
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 3  # simulator, consumer, bridge
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    finally:
        proc.kill()
        reader.join(10)

    assert proc.returncode == 130
    assert lines[-1].startswith("tutum-bridge: bench interrupted")
    assert "Traceback" not in "".join(lines)
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
    prefix = re.search(r"run (bench-[0-9a-f]+):", "".join(lines)).group(1)
    assert_nothing_left({"exchange": f"{prefix}.events", "queue": f"{prefix}.all",
                         "unrouted": f"{prefix}.unrouted", "quarantine": f"{prefix}.invalid"})


@pytest.mark.parametrize("args, error", [
    (["--bridges", "real,fastest"], "unknown bridge fastest"),
    (["--soak", "half an hour"], "expected a duration like 90s, 30m or 2h"),
    (["--plot", "/no/such/dir/b.png"], "--plot: no directory /no/such/dir"),
    (["--plot", "b.png", "--skip-latency"], "this run has neither"),
    (["--ha", "--events", "300000"], "real-ha's burst is at most 150000 events"),
])
def test_bad_usage_is_one_line_and_exit_2(args, error):
    proc = bench(*args)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert stderr.count("\n") == 1 and error in stderr
