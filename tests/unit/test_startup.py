"""Startup: a SIGTERM while the spool opens stops the bridge (exit 0), before anything
connects. The spool's open is made to deliver the signal itself, so the moment is exact."""

from __future__ import annotations

import os
import signal

from bridge import app, cli
from bridge import config as config_mod
from bridge.spool import Spool


def test_sigterm_while_the_spool_opens_exits_0_without_connecting(tmp_path, monkeypatch):
    environ = {"TUTUM_USER": "u", "TUTUM_APIKEY": "k", "BRIDGE_METRICS_ADDR": "",
               "BRIDGE_SPOOL": str(tmp_path / "spool.sqlite3"),
               "TUTUM_STREAM_HOST": "ws://127.0.0.1:9", "AMQP_URL": "amqp://127.0.0.1:9/%2F"}
    cfg = config_mod.load(cli.build_parser("run").parse_args(["run"]), environ)

    def opening_spool(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)      # as if it came during a long open
        return Spool(*args, **kwargs)

    def nothing_may_start(*args, **kwargs):
        raise AssertionError("started after the SIGTERM")

    monkeypatch.setattr(app, "Spool", opening_spool)
    monkeypatch.setattr(app, "Publisher", nothing_may_start)
    monkeypatch.setattr(app, "StreamReader", nothing_may_start)
    previous = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    # Were the bridge's handler not installed yet, this one would swallow the signal
    # and the bridge would go on to start (and fail the test), not kill pytest.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        assert app.Bridge(cfg).run() == 0
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
