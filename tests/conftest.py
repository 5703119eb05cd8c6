"""Fixtures shared by every test: unique broker names, and the real processes."""

from __future__ import annotations

import pytest

from tests.support import procs
from tests.support.broker import Topology


LOG_TAIL = 4000     # characters of each process's stderr shown with a failure


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """A failed test shows the end of every process's stderr (the bridge's log), taken
    before teardown stops them: tmp_path is gone after a CI run, and a failure that
    shows once in many runs can only be explained from what its run printed."""
    outcome = yield
    report = outcome.get_result()
    started = getattr(item, "funcargs", {}).get("processes")
    if report.when == "call" and report.failed and started:
        for proc in started:
            try:
                text = proc.stderr
            except OSError as exc:
                text = f"(unreadable: {exc})"
            report.sections.append((f"{proc.stderr_path.name}, last {LOG_TAIL} characters",
                                    text[-LOG_TAIL:]))


@pytest.fixture
def topology():
    """Unique exchange/queue names for this test, deleted afterwards."""
    topo = Topology()
    yield topo
    topo.cleanup()


@pytest.fixture
def processes(tmp_path, topology):
    """Collects started processes and stops whatever is still running at teardown.

    Depends on `topology` so processes stop before its names are deleted: a bridge
    still running at cleanup would re-declare them after the cleanup and leak them.
    """
    started: list[procs.Proc] = []
    yield started
    for proc in started:
        proc.stop(timeout=15)


@pytest.fixture
def simulator(tmp_path, processes):
    """Factory: simulator(*flags) -> a started simulator Proc."""
    def start(*flags: str, name: str = "simulator", **kw) -> procs.Proc:
        proc = procs.start_simulator(tmp_path, *flags, name=name, **kw)
        processes.append(proc)
        return proc
    return start


@pytest.fixture
def bridge(tmp_path, processes, topology):
    """Factory: bridge(sim, *flags, **env) -> a started bridge Proc for this topology."""
    def start(sim: procs.Proc, *flags: str, name: str = "bridge", **env: str) -> procs.Proc:
        full_env = procs.bridge_env(sim, tmp_path, topology.bridge_env(), **env)
        proc = procs.start_bridge(tmp_path, full_env, *flags, name=name)
        processes.append(proc)
        return proc
    return start
