"""One benchmark run: for each bridge in turn, burst, latency and idle measurements.

Every measurement is a fresh session: a simulator that starts sending when a client
connects, the benchmark's consumer on the run's queue, and the bridge under test,
all separate processes on real sockets. Bridges run one after another, never side by
side, so each has the machine (such as it is) to itself. The ceilings and the pipe
(bridge/bench/ceiling.py) are measured the same way, burst only, the pipe timed as a
bridge is (it is one, doing nothing but read and publish); the soak runs the
real bridge at a fixed rate for a long time, sampled as it goes (bridge/bench/timeline.py).
`real-ha` is the real bridge with BRIDGE_HA=on and a second replica witnessing, on a
`--fanout` simulator that starts the world once both are connected: the figures are
the leader's, plus what the standby costs.
"""

from __future__ import annotations

import json
import secrets
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import urlencode, urlsplit, urlunsplit

import pika
import psutil

from bridge.bench.children import BenchError, Child, Children, sim_stats, wait_until
from bridge.bench.legs import Legs
from bridge.bench.meter import Meter
from bridge.bench.proxy import PausedProxy
from bridge.bench.shares import CpuShares, broker_pid
from bridge.bench.timeline import Sampler, flatness, join
from bridge.bench.topology import Topology
from bridge.config import RUN_SETTINGS, bound_metrics_address

BRIDGES = ("real", "naive-confirm", "naive-fire")
CEILINGS = ("stream-ceiling", "broker-ceiling")
PIPE = "pipe-ceiling"          # the two halves chained: what sharing the machine leaves
LIMITS = CEILINGS + (PIPE,)    # rows measured in bursts only
HA = "real-ha"
HA_SIM_FLAGS = ("--fanout", "--clients", "2")
PREBUILD_MAX = 500_000      # events: about 300 MB of frames in the simulator
LATENCY_SAMPLE = 1.0   # seconds between samples of the latency phase (for the plot)
# The real bridge's default window of unconfirmed events, which the broker ceiling uses.
WINDOW = int(next(s.default for s in RUN_SETTINGS if s.name == "inflight"))
SIM_USER = "bench"
IDLE_SETTLE = 1.0      # seconds after the last event before idle CPU is measured
STALL_SECONDS = 30.0   # no progress this long: the bridge is stuck, give up
QUIET_CPU = 0.05       # CPU seconds per half second below which a bridge counts as idle
ROUND_FIGURES = ("events_per_second", "cpu_seconds_per_10k", "peak_rss_bytes")


@dataclass
class Settings:
    amqp_url: str
    events: int = 50_000
    rate: int = 1_000
    latency_seconds: float = 20.0
    idle_seconds: float = 30.0
    bridges: tuple[str, ...] = BRIDGES + LIMITS
    skip_latency: bool = False
    skip_idle: bool = False
    backlog: int = 0
    soak_seconds: float = 0.0
    soak_rate: int = 2_000
    sample_seconds: float = 10.0
    burst_rounds: int = 3


@dataclass
class Session:
    """The processes of one measurement."""

    name: str
    sim: Child
    bridge: Child               # with HA, the leader
    consumer: Child | None      # none for the stream ceiling, which publishes nothing
    results: Path
    progress: Path
    ceiling_out: Path
    standby: Child | None = None
    metrics_url: str | None = None      # the bridge's /metrics, when it listens
    meter: Meter = field(init=False)
    standby_meter: Meter | None = field(init=False)

    def __post_init__(self) -> None:
        self.meter = Meter(self.bridge.pid)
        self.standby_meter = Meter(self.standby.pid) if self.standby else None

    @property
    def processes(self) -> list[Child]:
        return [c for c in (self.sim, self.bridge, self.standby, self.consumer)
                if c is not None]


class Bench:
    def __init__(self, settings: Settings, workdir: Path, base_env: dict[str, str],
                 say: Callable[[str], None]) -> None:
        self.settings, self.workdir, self.say = settings, workdir, say
        self.children = Children(workdir, base_env)
        self.topology = Topology()
        self.apikey = secrets.token_hex(12)
        self.sessions: Counter[str] = Counter()     # by bridge and phase
        self.broker_pid = broker_pid(settings.amqp_url)     # None: not on this machine

    def run(self) -> dict:
        """All figures, by bridge. Stops and deletes everything it started, however it ends."""
        url = self.settings.amqp_url
        try:
            self.say(f"run {self.topology.prefix}: exchange {self.topology.exchange}, "
                     f"queue {self.topology.queue}")
            self.topology.declare(url)
            bursts = self.bursts()
            figures = {bridge: self.measure(bridge, bursts[bridge])
                       for bridge in self.settings.bridges}
            if self.settings.backlog:
                figures.setdefault("real", {})["backlog"] = self.backlog()
            if self.settings.soak_seconds:
                figures.setdefault("real", {})["soak"] = self.soak()
            return figures
        finally:
            self.children.stop_all()
            try:
                self.topology.delete(url)
            except pika.exceptions.AMQPError as exc:
                self.say(f"warning: could not delete {self.topology.prefix}.*: {exc!r}")

    def bursts(self) -> dict[str, dict]:
        """Every bridge's and ceiling's burst, in turn, `burst_rounds` times: by bridge,
        the figures of its median round (by throughput; the peak RSS is of all rounds),
        with each round's throughput, CPU and RSS.

        Rounds, because on a shared machine one burst's throughput moves by a fifth
        from one run to the next, rows and ceilings alike: the share of the limit is
        taken between rows of one round (`report.ratios`), and the median of rounds
        says more than any one of them."""
        n, bridges = self.settings.burst_rounds, self.settings.bridges
        rounds = []
        for number in range(1, n + 1):
            if n > 1:
                self.say(f"burst round {number} of {n}")
            rounds.append({b: self.ceiling_burst(b) if b in CEILINGS else self.burst(b)
                           for b in bridges})
        out = {}
        for bridge in bridges:
            runs = [r[bridge] for r in rounds]
            median = sorted(runs, key=lambda f: f["events_per_second"])[(n - 1) // 2]
            out[bridge] = {**median, "peak_rss_bytes": max(r["peak_rss_bytes"] for r in runs),
                           "rounds": [{key: run[key] for key in ROUND_FIGURES} for run in runs]}
        return out

    def measure(self, bridge: str, burst: dict) -> dict:
        s = self.settings
        if bridge in LIMITS:
            return {"burst": burst, "peak_rss_bytes": burst["peak_rss_bytes"]}
        figures = {"burst": burst}
        if not s.skip_latency:
            count = round(s.rate * s.latency_seconds)
            with self.session(bridge, "latency", count, "--rate", str(s.rate),
                              *_sim_flags(bridge), buckets=LATENCY_SAMPLE) as session:
                sampler = self.sampler(session, LATENCY_SAMPLE)
                meters = {"bridge": session.meter, "standby": session.standby_meter}
                before = {k: m.cpu() for k, m in meters.items() if m}
                got = self.deliver(session, count, tick=sampler.tick)
                cpu = {k: (meters[k].cpu() - v) * 10_000 / count for k, v in before.items()}
                figures["latency"] = {"rate": s.rate, "events": count,
                                      "latency_ms": got["latency_ms"],
                                      "cpu_seconds_per_10k": cpu["bridge"],
                                      "peak_rss_bytes": session.meter.peak_rss(),
                                      "samples": join(sampler.samples, got["buckets"])}
                if "standby" in cpu:
                    figures["latency"]["standby"] = {"cpu_seconds_per_10k": cpu["standby"]}
                if not s.skip_idle:
                    figures["idle"] = self.idle(session)
        elif not s.skip_idle:
            # The simulator's --count is at least 1: one event proves the path, then silence.
            with self.session(bridge, "idle", 1, "--rate", "0", *_sim_flags(bridge)) as session:
                self.deliver(session, 1)
                figures["idle"] = self.idle(session)
        figures["peak_rss_bytes"] = max(f["peak_rss_bytes"] for f in figures.values()
                                        if "peak_rss_bytes" in f)
        return figures

    def burst(self, bridge: str) -> dict:
        n = self.settings.events
        with self.session(bridge, "burst", n, "--rate", "0", *_sim_flags(bridge)) as session:
            # The standby's share is counted from before the burst can reach it (the
            # world starts when it connects, and it may read a small burst whole before
            # the leader's figures are taken) until it has gone quiet after the burst
            # (it forgets what it witnessed after the consumer has it all).
            standby_before = session.standby_meter.cpu_exact() if session.standby_meter else None
            self.wait_until_sending(session)
            shares = self.cpu_shares(session)
            written_before = session.meter.written()
            got = self.deliver(session, n)
            written = session.meter.written() - written_before
            machine = shares.stop(n)
            # The bridge's own figure is its share's, read over the same stretch.
            cpu = machine["cpu_seconds_per_10k"]["bridge"] * n / 10_000
            figures = {**_burst(session, n, got["last_delivery"] - got["first_sent"], cpu),
                       "written_bytes": written, "written_bytes_per_event": written / n,
                       "latency_ms": got["latency_ms"], "duplicates": got["duplicates"],
                       "machine": machine}
            if session.standby_meter:
                wait_until(lambda: _quiet(session.standby_meter), 60,
                           "the standby to finish witnessing", session.standby)
                cpu = session.standby_meter.cpu_exact() - standby_before
                figures["standby"] = {"cpu_seconds": cpu, "cpu_seconds_per_10k": cpu * 10_000 / n,
                                      "peak_rss_bytes": session.standby_meter.peak_rss()}
            return figures

    def ceiling_burst(self, ceiling: str) -> dict:
        """The stream ceiling from the first send to its last frame; the broker ceiling
        from its first publish (its messages read and built beforehand) to the last
        delivery. Each times its own CPU over that stretch: a small burst is over before
        the harness could read a figure from outside."""
        n = self.settings.events
        with self.session(ceiling, "burst", n, "--rate", "0",
                          consumer=ceiling == "broker-ceiling") as session:
            out = session.ceiling_out
            if ceiling == "stream-ceiling":
                got = self._follow(session, n, "received",
                                   lambda: "cpu_seconds" in _read_json(out),
                                   lambda: sim_stats(session.sim).get("sent", 0),
                                   lambda: _read_json(out))
                return _burst(session, n, got["last_received"] - got["first_sent"],
                              got["cpu_seconds"])
            wait_until(out.exists, STALL_SECONDS + n / 1000,
                       f"{session.name} to read and build its messages", session.bridge)
            shares = self.cpu_shares(session)
            got = self.deliver(session, n)
            machine = shares.stop(n)
            wait_until(lambda: "cpu_seconds" in _read_json(out), STALL_SECONDS,
                       f"{session.name} to see its last confirm", session.bridge)
            return {**_burst(session, n, got["last_delivery"] - _read_json(out)["started"],
                             _read_json(out)["cpu_seconds"]), "machine": machine}

    def soak(self) -> dict:
        """The real bridge at a fixed rate for a long time, sampled as it goes."""
        s = self.settings
        count = round(s.soak_rate * s.soak_seconds)
        with self.session("real", "soak", count, "--rate", str(s.soak_rate),
                          buckets=s.sample_seconds, metrics=True) as session:
            sampler = self.sampler(session, s.sample_seconds, Legs(session.metrics_url).sample)
            got = self.deliver(session, count, tick=sampler.tick)
            samples = join(sampler.samples, got["buckets"])
            return {"rate": s.soak_rate, "seconds": s.soak_seconds, "events": count,
                    "sample_seconds": s.sample_seconds, "latency_ms": got["latency_ms"],
                    "peak_rss_bytes": session.meter.peak_rss(),
                    "duplicates": got["duplicates"], "samples": samples,
                    "summary": flatness(samples)}

    def sampler(self, session: Session, interval: float,
                legs: Callable[[], dict] | None = None) -> Sampler:
        spooled = session.name.startswith("real")
        return Sampler(session.meter, interval,
                       lambda: _read_json(session.progress).get("count", 0),
                       lambda: self.spool_bytes(session) if spooled else None, legs)

    def spool_bytes(self, session: Session) -> int:
        """The real bridge's spool on disk: database, WAL and shared-memory index."""
        total, spool = 0, self.spool(session.name)
        for path in (spool, spool.with_name(spool.name + "-wal"),
                     spool.with_name(spool.name + "-shm")):
            try:
                total += path.stat().st_size
            except OSError:
                continue  # SQLite removed it as we looked
        return total

    def idle(self, session: Session) -> dict:
        wait_until(lambda: _connected(session), 30, f"{session.name} to connect", session.bridge)
        time.sleep(IDLE_SETTLE)  # let the last events' bookkeeping finish: measured, not synced
        cpu_before, start = session.meter.cpu_exact(), time.monotonic()
        end = start + self.settings.idle_seconds
        while (now := time.monotonic()) < end:
            session.bridge.check()
            self.say(f"idle     {session.name:24} {now - start:5.0f}/"
                     f"{self.settings.idle_seconds:g} s")
            time.sleep(min(1.0, end - now))
        cpu, seconds = session.meter.cpu_exact() - cpu_before, time.monotonic() - start
        return {"seconds": seconds, "cpu_seconds": cpu, "cpu_percent": 100 * cpu / seconds}

    def backlog(self) -> dict:
        """The real bridge with the broker cut: spool N events, then time the drain."""
        n, target = self.settings.backlog, urlsplit(self.settings.amqp_url)
        proxy = PausedProxy(target.hostname, target.port or 5672)
        userinfo, at, _ = target.netloc.rpartition("@")
        proxied = urlunsplit(target._replace(netloc=f"{userinfo}{at}127.0.0.1:{proxy.port}"))
        try:
            with self.session("real", "backlog", n, "--rate", "0", amqp_url=proxied,
                              env={"BRIDGE_RECONNECT_MAX": "1"}) as session:
                self.wait_spooled(session, n)
                waiting_rss = session.meter.peak_rss()
                spool_bytes = self.spool_bytes(session)
                resumed_at = time.time()
                proxy.resume()
                got = self.deliver(session, n)
                return {"events": n, "peak_rss_waiting_bytes": waiting_rss,
                        "peak_rss_bytes": session.meter.peak_rss(), "spool_bytes": spool_bytes,
                        "first_delivery_after_resume_s": got["first_delivery"] - resumed_at,
                        "drain_seconds": got["last_delivery"] - resumed_at,
                        "drain_events_per_second": n / (got["last_delivery"] - resumed_at)}
        finally:
            proxy.close()

    # --- sessions ----------------------------------------------------------------------

    @contextmanager
    def session(self, bridge: str, phase: str, count: int, *sim_flags: str,
                amqp_url: str | None = None, env: dict | None = None, consumer: bool = True,
                buckets: float = 0.0, metrics: bool = False) -> Iterator[Session]:
        name = f"{bridge}-{phase}"
        self.sessions[name] += 1
        if self.sessions[name] > 1:     # a later round: its files are its own, not read stale
            name += f"-{self.sessions[name]}"
        self.topology.purge(self.settings.amqp_url)
        started: list[Child] = []
        try:
            # Generating events is most of the simulator's work, and it shares the cores
            # with what is measured: a stream the size of a burst is built beforehand.
            prebuild = ("--prebuild",) if count <= PREBUILD_MAX else ()
            sim = self.children.simulator(f"{name}.sim", SIM_USER, self.apikey, "--sequence",
                                          "--count", str(count), *prebuild, *sim_flags)
            started.append(sim)
            results = self.workdir / f"{name}.results.json"
            progress = self.workdir / f"{name}.progress.json"
            ceiling_out = self.workdir / f"{name}.ceiling.json"
            reader = None
            if consumer:
                reader = self.start_consumer(name, count, results, progress, buckets)
                started.append(reader)
            standby = metrics_url = None
            if bridge == HA:
                leader = self.start_replica(name, sim, "ha.leader", started)
                standby = self.start_replica(f"{name}-standby", sim, "ha.standby", started)
            else:
                started.append(self.start_bridge(bridge, name, sim, count, ceiling_out,
                                                 amqp_url, env or {}, metrics))
                leader = started[-1]
                if metrics:
                    metrics_url = self.metrics_url(name, leader)
            yield Session(name, sim, leader, reader, results, progress, ceiling_out, standby,
                          metrics_url)
        finally:
            self.children.stop(*reversed(started))

    def start_replica(self, name: str, sim: Child, role: str, started: list[Child]) -> Child:
        """One BRIDGE_HA=on replica, once its log says it took `role`: the first one
        started leads, so the leader is known before the second connects."""
        replica = self.start_bridge("real", name, sim, 0, Path(), None,
                                    {"BRIDGE_HA": "on", "LOG_LEVEL": "info"})
        started.append(replica)
        wait_until(lambda: role in replica.log.read_text(errors="replace"), 30,
                   f"{name} to log {role}", replica, sim)
        return replica

    def start_consumer(self, name: str, count: int, results: Path, progress: Path,
                       buckets: float) -> Child:
        ready = self.workdir / f"{name}.consumer.ready"
        consumer = self.children.start(f"{name}.consumer", [
            "-m", "bridge.bench.consumer", "--amqp-url", self.settings.amqp_url,
            "--queue", self.topology.queue, "--expect", str(count), "--out", str(results),
            "--progress", str(progress), "--ready-file", str(ready),
            "--bucket-seconds", str(buckets)])
        wait_until(ready.exists, 20, "the consumer to start", consumer)
        return consumer

    def start_bridge(self, bridge: str, name: str, sim: Child, count: int, ceiling_out: Path,
                     amqp_url: str | None, env: dict, metrics: bool = False) -> Child:
        amqp_url = amqp_url or self.settings.amqp_url
        if bridge == "real":
            # A metrics listener only where its histograms are read, on a port of its own.
            listen = "127.0.0.1:0" if metrics else ""
            return self.children.start(name, ["-m", "bridge", "run", f"--metrics-addr={listen}"], {
                "TUTUM_STREAM_HOST": sim.info["url"], "TUTUM_USER": SIM_USER,
                "TUTUM_APIKEY": self.apikey, "AMQP_URL": amqp_url,
                "BRIDGE_EXCHANGE": self.topology.exchange,
                "BRIDGE_UNROUTED": self.topology.unrouted,
                "BRIDGE_QUARANTINE": self.topology.quarantine,
                "BRIDGE_SPOOL": str(self.spool(name)),
                "LOG_LEVEL": "warning", **env})
        stream = f"{sim.info['url']}/v1/events?" + urlencode({"token": self.apikey,
                                                               "user": SIM_USER})
        if bridge in LIMITS:
            kind = bridge.split("-")[0]
            return self.children.start(name, [
                "-m", "bridge.bench.ceiling", kind, stream, "--expect", str(count),
                "--out", str(ceiling_out), "--amqp-url", amqp_url,
                "--exchange", self.topology.exchange, "--window", str(WINDOW)])
        confirm = "--confirm" if bridge == "naive-confirm" else "--no-confirm"
        return self.children.start(name, ["-m", "bridge.bench.naive", confirm, stream,
                                          amqp_url, self.topology.exchange])

    def metrics_url(self, name: str, bridge: Child) -> str:
        """The /metrics of a real bridge started with a listener on port 0."""
        spool = self.spool(name)
        wait_until(lambda: bound_metrics_address(spool) is not None, 30,
                   f"{name} to open its metrics listener", bridge)
        host, port = bound_metrics_address(spool)
        return f"http://{host}:{port}/metrics"

    def spool(self, name: str) -> Path:
        return self.workdir / f"{name}.spool.sqlite3"

    # --- waiting, with progress ---------------------------------------------------------

    def wait_until_sending(self, session: Session) -> None:
        """Until events flow: the bridge's start-up is not per-event cost. By then its
        threads are all up, so the scheduler's nanosecond counters that `cpu_shares`
        reads cover the burst (a small burst, read from a prebuilt stream, is tens of
        milliseconds of CPU spread over threads, which 10 ms ticks could count as none)."""
        wait_until(lambda: sim_stats(session.sim).get("sent", 0) > 0, 30,
                   f"{session.name} to connect", session.bridge, session.sim, interval=0.01)

    def cpu_shares(self, session: Session) -> CpuShares:
        """Started now: each process's CPU and the machine's (bridge/bench/shares.py)."""
        shares = CpuShares({
            "bridge": session.bridge.pid, "standby": session.standby and session.standby.pid,
            "broker": self.broker_pid, "simulator": session.sim.pid,
            "consumer": session.consumer and session.consumer.pid})
        shares.start()
        return shares

    def deliver(self, session: Session, expect: int,
                tick: Callable[[], None] | None = None) -> dict:
        """The consumer's results once it has every event, printing progress each second.

        The consumer also writes its results when it ends early (its connection
        closed, a signal): those are a failed run, not a shorter one."""
        got = self._follow(session, expect, "delivered", session.results.exists,
                           lambda: _read_json(session.progress).get("count", 0),
                           lambda: _read_json(session.results), tick)
        if got["count"] < expect:
            raise BenchError(f"{session.name}: the consumer ended with {got['count']}/{expect} "
                             f"delivered; its last output: {session.consumer.last_line()}")
        return got

    def wait_spooled(self, session: Session, expect: int) -> None:
        """Until the simulator has sent all and the bridge has stopped working on them."""
        def sent() -> int:
            return sim_stats(session.sim).get("sent", 0)

        self._follow(session, expect, "sent to the cut-off bridge", lambda: sent() >= expect,
                     sent, lambda: None)
        wait_until(lambda: _quiet(session.meter), 120, "the bridge to finish spooling",
                   session.bridge)

    def _follow(self, session: Session, expect: int, verb: str, done: Callable[[], bool],
                count: Callable[[], int], result: Callable[[], dict | None],
                tick: Callable[[], None] | None = None) -> dict | None:
        """Polls `done`, saying `count` each second; fails if a process dies or it stalls.

        `tick`, if given, is called on every poll (a sampler that takes what is due)."""
        phase = session.name.split("-")[-1]
        last_count, last_at, changed_at = 0, time.monotonic(), time.monotonic()
        while not done():
            for child in session.processes:
                if child is not session.consumer:
                    child.check()
            if session.consumer is not None and session.consumer.popen.poll() is not None \
                    and not session.results.exists():
                session.consumer.check()
            if tick is not None:
                tick()
            now = time.monotonic()
            if now - last_at >= 1.0:
                current = count()
                self.say(f"{phase:8} {session.name:24} {current:>9}/{expect} {verb}"
                         f" {(current - last_count) / (now - last_at):>9.0f} ev/s")
                if current != last_count:
                    changed_at = now
                elif now - changed_at > STALL_SECONDS:
                    raise BenchError(f"{session.name}: stuck at {current}/{expect} {verb} "
                                     f"for {STALL_SECONDS:g}s; its last output: "
                                     f"{session.bridge.last_line()}")
                last_count, last_at = current, now
            time.sleep(0.05)
        return result()


def _sim_flags(bridge: str) -> tuple[str, ...]:
    return HA_SIM_FLAGS if bridge == HA else ()


def _burst(session: Session, n: int, seconds: float, cpu: float) -> dict:
    return {"events": n, "seconds": seconds, "events_per_second": n / seconds,
            "cpu_seconds": cpu, "cpu_seconds_per_10k": cpu * 10_000 / n,
            "peak_rss_bytes": session.meter.peak_rss()}


def _connected(session: Session) -> bool:
    """The bridge holds a TCP connection to the simulator."""
    port = session.sim.info["port"]
    return any(c.raddr and c.raddr.port == port and c.status == psutil.CONN_ESTABLISHED
               for c in session.meter.process.net_connections("tcp"))


def _quiet(meter: Meter) -> bool:
    before = meter.cpu()
    time.sleep(0.5)
    return meter.cpu() - before < QUIET_CPU


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
