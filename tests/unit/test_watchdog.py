"""systemd's notify protocol (bridge/watchdog.py) over a real datagram socket: ready,
keep-alives only while live and no more often than half the interval, stopping."""

from __future__ import annotations

import socket

from bridge.config import Notify, systemd_notify
from bridge.watchdog import Watchdog


class Clock:
    now = 100.0

    def __call__(self) -> float:
        return self.now


def received(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(256))
        except BlockingIOError:
            return out


def test_keepalives_follow_liveness_at_half_the_interval(tmp_path):
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        sock.setblocking(False)
        clock, live = Clock(), [True]
        watchdog = Watchdog(Notify(path, 10.0), lambda: live[0], clock)
        watchdog.ready()
        watchdog.tick()
        clock.now += 2
        watchdog.tick()                 # 2 s after a kick: not due
        assert received(sock) == [b"READY=1", b"WATCHDOG=1"]
        clock.now += 4
        live[0] = False                 # a stuck thread: no keep-alive, systemd restarts
        watchdog.tick()
        assert received(sock) == []
        live[0] = True
        watchdog.tick()
        watchdog.stopping()
        assert received(sock) == [b"WATCHDOG=1", b"STOPPING=1"]


def test_the_environment_systemd_sets_and_whose_watchdog_it_is():
    env = {"NOTIFY_SOCKET": "@/org/freedesktop/systemd1/notify", "WATCHDOG_USEC": "30000000"}
    assert systemd_notify(env, pid=42) == Notify(env["NOTIFY_SOCKET"], 30.0)
    assert systemd_notify({**env, "WATCHDOG_PID": "7"}, pid=42).watchdog_seconds is None
    assert systemd_notify({"WATCHDOG_USEC": "30000000"}) is None


def test_without_systemd_nothing_is_sent():
    watchdog = Watchdog(None, lambda: True)
    watchdog.ready()
    watchdog.tick()
    watchdog.stopping()
