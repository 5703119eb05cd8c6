"""The delivery guarantee (docs/contract.md section 4) under the stream-side faults of issue 8.

Same bench and books as tests/test_faults.py: a private RabbitMQ node, the simulator
with `--sequence`, the real bridge, and a ledger at the end (`pytest -s` prints it).
Here the faults are on the bridge's own side: the spool's filesystem fills up for
real (a small tmpfs, mounted by the test as root).

Reproduce one: `FAULT_REPORT=/tmp/faults.jsonl .venv/bin/python -m pytest -s tests/test_faults_stream.py -k NAME`.
"""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from tests.support.fault_rig import assert_guarantee
from tests.support.wait import wait_for
from tests.test_faults import rig  # noqa: F401 - the fixture
from tests.support.rabbit_node import extra_node, healthy_node  # noqa: F401 - fixtures of rig

SMALL_FS = "1m"


@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of SMALL_FS for the spool, unmounted at the end whatever happened."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "small-fs"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_FS}", "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mount
    finally:
        # Lazy: a bridge that failed to stop must not leave the mount behind.
        subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_the_spools_filesystem_fills_up_and_nothing_is_lost(small_fs, rig):  # noqa: F811
    """The broker is away and the spool's 1 MB filesystem fills (ENOSPC long before the
    2 GiB BRIDGE_SPOOL_MAX_BYTES): the bridge keeps the batch it had read, stops
    reading the stream, says so (log and metrics), and stays up; when the broker is
    back it drains, the full database is replaced by an empty one, reading resumes,
    and every event arrives in order."""
    sim = rig.simulator("--rate", "3000", "--count", "9000")
    proxy = rig.broker_proxy()
    proc = rig.bridge(sim, via=proxy, BRIDGE_SPOOL=str(small_fs / "spool.sqlite3"))
    rig.wait_delivered(300)

    proxy.pause()
    full = rig.wait_log(proc, "spool.disk_full", 60)
    assert "full" in full["error"]

    def received():
        return rig.metric(proc, "tutum_bridge_frames_received_total", 'kind="event"')

    def plateau():
        first = received()
        time.sleep(1.0)     # a second without a single event spooled: the reader stopped
        return received() == first and first
    stuck_at = wait_for(plateau, 30, 0, what="the bridge to stop taking events")
    assert stuck_at < 9000
    assert rig.metric(proc, "tutum_bridge_spool_unwritable") == 1
    assert rig.metric(proc, "tutum_bridge_backpressure") == 1
    assert rig.metric(proc, "tutum_bridge_spool_errors_total", 'operation="append"') >= 1
    proxy.resume()
    rig.wait_log(proc, "spool.resumed", 60)

    ledger = rig.settle(sim, 9000, timeout=90, stuck_at=stuck_at,
                        spool_errors=len(rig.log_events(proc, "spool.error")))
    assert_guarantee(ledger)
    rig.check_bridge()
    assert rig.metric(proc, "tutum_bridge_spool_unwritable") == 0
