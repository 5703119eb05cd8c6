"""The bench of a fault test: a private broker, a `#` queue, the simulator, the bridge.

Every fault test does the same things around its fault: bind a queue to everything
on its own exchange of the private node before the bridge starts, collect that queue
from the start, run the simulator with `--sequence`, run the bridge (directly or
through proxies), read the bridge's JSON log, and at the end settle the books
(`settle`: wait until the simulator has sent everything and the queue holds it, then
compute and report the ledger). `close` stops bridges first, while their links still
work, so teardown never waits out a shutdown timeout against a dead proxy.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import psutil

from tests.support import procs
from tests.support.broker import Topology
from tests.support.ledger import Collector, Ledger, compute
from tests.support.rabbit_node import RabbitNode
from tests.support.tcp_proxy import TcpProxy
from tests.support.wait import wait_for


class Rig:
    def __init__(self, test: str, node: RabbitNode, topology: Topology, simulator, bridge,
                 tmp_path: Path, queue_arguments: dict | None = None,
                 url: str | None = None) -> None:
        self.test = test
        self.node = node
        self.url = url or node.url          # another vhost of the node, or its default
        self.topology = topology
        self._start_simulator = simulator
        self._start_bridge = bridge
        self.tmp_path = tmp_path
        self.queue = topology.bind("#", url=self.url, arguments=queue_arguments)
        self.collector = Collector(self.url, self.queue).start()
        self.proxies: list[TcpProxy] = []
        self.bridges: list[procs.Proc] = []

    # --- processes ------------------------------------------------------------------

    def simulator(self, *flags: str) -> procs.Proc:
        return self._start_simulator("--sequence", "--seed", "7", *flags)

    def proxy(self, port: int) -> TcpProxy:
        proxy = TcpProxy("127.0.0.1", port)
        self.proxies.append(proxy)
        return proxy

    def broker_proxy(self) -> TcpProxy:
        return self.proxy(self.node.port)

    @staticmethod
    def amqp_url(proxy: TcpProxy) -> str:
        return proxy.url("amqp", "guest:guest@", "/%2F")

    def bridge(self, sim: procs.Proc, *, via: TcpProxy | None = None, name: str = "bridge",
               **env: str) -> procs.Proc:
        env.setdefault("AMQP_URL", self.amqp_url(via) if via else self.url)
        env["BRIDGE_METRICS_ADDR"] = "127.0.0.1:0"     # a port of its own: see metric()
        proc = self._start_bridge(sim, name=name, **env)
        self.bridges.append(proc)
        return proc

    def check_bridge(self) -> None:
        """The latest bridge must be running; fail now with its log, not at a deadline."""
        if self.bridges and (code := self.bridges[-1].popen.poll()) is not None:
            raise AssertionError(f"bridge exited {code}:\n{self.bridges[-1].stderr[-3000:]}")

    # --- observing ------------------------------------------------------------------

    @staticmethod
    def stats(sim: procs.Proc) -> dict:
        return procs.simulator_stats(sim)

    def sent(self, sim: procs.Proc) -> int:
        return self.stats(sim)["sent"]

    def wait_sent(self, sim: procs.Proc, at_least: int, timeout: float = 30) -> int:
        def sent():
            self.check_bridge()
            return (n := self.sent(sim)) >= at_least and n
        return wait_for(sent, timeout, 0.1, what=f"simulator to send {at_least} events")

    def wait_delivered(self, at_least: int, timeout: float = 30) -> None:
        def delivered():
            self.check_bridge()
            return self.collector.has_all(at_least)
        wait_for(delivered, timeout, 0.1, what=f"sim_seq 1..{at_least} in the queue")

    @staticmethod
    def log(proc: procs.Proc) -> list[dict]:
        """The bridge's JSON log lines (anything else on stderr is skipped)."""
        lines = []
        for line in proc.stderr.splitlines():
            if line.startswith("{"):
                try:
                    lines.append(json.loads(line))
                except ValueError:
                    pass
        return lines

    def log_events(self, proc: procs.Proc, event: str) -> list[dict]:
        return [line for line in self.log(proc) if line.get("event") == event]

    def wait_log(self, proc: procs.Proc, event: str, timeout: float = 30, count: int = 1) -> dict:
        def seen():
            if proc.popen.poll() is not None:
                raise AssertionError(f"bridge exited {proc.popen.returncode} waiting for "
                                     f"{event}:\n{proc.stderr[-3000:]}")
            found = self.log_events(proc, event)
            return found[count - 1] if len(found) >= count else None
        return wait_for(seen, timeout, 0.05, what=f"bridge log event {event!r} x{count}")

    metric = staticmethod(procs.metric)

    @staticmethod
    def rss(proc: procs.Proc) -> int:
        return psutil.Process(proc.popen.pid).memory_info().rss

    @staticmethod
    def session_counts(sim: procs.Proc) -> dict[int, int]:
        """Events sent per simulator connection, from its `closed` log lines."""
        counts = {}
        for match in re.finditer(r"closed\s.*?\bconn=(\d+)\b.*?\bsent=(\d+)", sim.stderr):
            counts[int(match.group(1))] = int(match.group(2))
        return counts

    def bridge_connection_pids(self) -> list[str]:
        """Erlang pids of this test's bridge connections on the node (by connection name)."""
        wanted = f'{{"connection_name","tutum-bridge {self.topology.exchange}"}}'
        listing = self.node.ctl("list_connections", "--no-table-headers", "pid",
                                "client_properties")
        return [line.partition("\t")[0].strip() for line in listing.splitlines()
                if wanted in line]

    # --- the books --------------------------------------------------------------------

    def settle(self, sim: procs.Proc, count: int, timeout: float = 90,
               allow_missing: frozenset[int] = frozenset(), **extra) -> Ledger:
        """Wait until the simulator sent all `count` events and 1..count (but those
        `allow_missing`) are in the queue, or the deadline passes: the ledger then
        shows what is missing."""
        deadline = time.monotonic() + timeout
        try:
            self.wait_sent(sim, count, timeout)
        except AssertionError as exc:
            if "bridge exited" in str(exc):
                raise
        sent = self.sent(sim)
        self.collector.wait(sent, max(deadline - time.monotonic(), 1.0), settle=0.5,
                            allow_missing=allow_missing)
        return compute(self.test, sent, list(self.collector.messages), **extra).report()

    def missing(self, ledger: Ledger) -> set[int]:
        return set(range(1, ledger.sent + 1)) - {m.seq for m in self.collector.messages if m.seq}

    def close(self) -> None:
        for proxy in self.proxies:
            proxy.resume()
        for proc in self.bridges:
            proc.stop(timeout=20)
        for proxy in self.proxies:
            proxy.close()
        self.collector.stop()
        self.topology.cleanup(url=self.url)


def assert_guarantee(ledger: Ledger, duplicates_allowed: bool = True,
                     lost_allowed: frozenset[int] = frozenset(),
                     missing: set[int] | None = None) -> None:
    """docs/contract.md section 4: nothing lost, order kept, and every duplicate flagged as possible.

    `lost_allowed`: events the bridge never had (written by the simulator into a
    socket the network or a stop discarded); only a contiguous run of them may be
    missing, and `missing` (`Rig.missing`) must then be given.
    """
    if lost_allowed:
        assert missing is not None
        assert missing <= lost_allowed, f"{sorted(missing - lost_allowed)[:10]}: {ledger.summary()}"
        assert not missing or len(missing) == max(missing) - min(missing) + 1, ledger.summary()
    else:
        assert ledger.lost == 0, ledger.summary()
    assert ledger.beyond_sent == 0, ledger.summary()
    assert ledger.out_of_order == 0, ledger.summary()
    assert ledger.unexplained_duplicates == 0, ledger.summary()
    if not duplicates_allowed:
        assert ledger.duplicates == 0, ledger.summary()
